"""What every torch runner shares, through the public API in both modes: the framework
report, devices, threads, outputs bound by name, and model files of another format refused
with the caller's path (never the staging folder's copy) and the function that takes them."""

import os

import numpy as np
import pytest
import torch

import ope
from ope import EnvError, PackageError, TensorSpec

import models
import torch_models
from torch_models import CRITIC_INPUTS, CRITIC_OUTPUTS

pytestmark = models.USES_TORCHSCRIPT

SAMPLE_INPUTS = {
    "critic": {"obs": np.ones((2, 4), np.float32), "scale": np.ones((2, 1), np.float32)},
    "scorer": {"x": np.ones((2, 3), np.float32), "trip": np.int64(0)},
    "gated": {"obs": np.ones((2, 4), np.float32), "gain": np.float32(1)},
    "eager": {"x": np.ones((2, 3), np.float32), "mask": np.array([True, False])},
}


@pytest.fixture(scope="module")
def torch_packages(package_root, gated, eager):
    root = str(package_root)
    example = {"obs": np.ones((2, 4), np.float32), "scale": np.ones((2, 1), np.float32)}
    critic = ope.package_torch_export(
        os.path.join(root, "shared-critic"), torch_models.export_critic(), name="critic",
        inputs=CRITIC_INPUTS, outputs=CRITIC_OUTPUTS, test_inputs=example,
        test_outputs=torch_models.critic_reference(example))
    scorer, _ = torch_models.torch_package_model(root, name="shared-scorer")
    return {"critic": critic, "scorer": scorer, "gated": gated, "eager": eager}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One model file of each torch format, and one that is none."""
    root = tmp_path_factory.mktemp("files")
    paths = {"torch_package": torch_models.torch_package_archive(str(root))[0],
             "torch_export": str(root / "critic.pt2"), "torchscript": str(root / "gated.pt"),
             "garbage": str(root / "garbage.pt2")}
    torch.export.save(torch_models.export_critic(), paths["torch_export"])
    torch.jit.save(torch.jit.script(models.GatedPolicy()), paths["torchscript"])
    with open(paths["garbage"], "wb") as file:
        file.write(b"PK\x03\x04 but no archive follows")
    return paths


RUNNERS = {"critic": "torch_export", "scorer": "torch_package", "gated": "torchscript",
           "eager": "python"}


@pytest.mark.parametrize("kind", sorted(RUNNERS))
def test_stats_name_the_runner_framework_and_device(load_model, torch_packages, kind):
    model = load_model(torch_packages[kind].path, device="cpu")
    model.infer(SAMPLE_INPUTS[kind])
    worker = model.stats()["worker"]
    assert (worker["runner"], worker["framework"], worker["framework_version"],
            worker["device"]) == (RUNNERS[kind], "torch", torch.__version__, "cpu")


@pytest.mark.parametrize("kind", sorted(RUNNERS))
def test_threads_reach_torch_in_the_worker(torch_packages, kind):
    with ope.load(torch_packages[kind].path, out_of_process=True, threads=1) as model:
        assert model.stats()["worker"]["torch_threads"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is seen")
@pytest.mark.parametrize("kind", sorted(RUNNERS))
def test_cuda_without_a_gpu_is_an_env_error_naming_the_device(load_model, torch_packages, kind):
    with pytest.raises(EnvError, match=r"device 'cuda:0': torch .* sees no CUDA GPU"):
        load_model(torch_packages[kind].path, device="cuda:0")


@pytest.mark.parametrize("kind", sorted(RUNNERS))
def test_cuda_device_runs_the_model_on_the_gpu(load_model, torch_packages, kind):
    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} sees no CUDA GPU here")
    package = torch_packages[kind]
    on_cpu = load_model(package.path, device="cpu").infer(SAMPLE_INPUTS[kind])
    model = load_model(package.path, device="cuda:0")
    on_gpu = model.infer(SAMPLE_INPUTS[kind])
    assert model.stats()["worker"]["device"] == "cuda:0"
    for name, expected in on_cpu.items():
        np.testing.assert_allclose(on_gpu[name], expected, rtol=1e-4, atol=1e-5)


_NAMED_TUPLE_SOURCE = '''
import collections

import torch

Estimate = collections.namedtuple("Estimate", ["value", "advantage"])


def factory(data_dir):
    def estimate(obs):
        return Estimate(value=obs.sum(1), advantage=obs[:, :2] * 2)
    return estimate
'''


def test_named_tuple_binds_by_field_not_position(load_model, tmp_path):
    package = models.numpy_package(
        str(tmp_path), _NAMED_TUPLE_SOURCE, name="estimate", framework="torch",
        inputs=[CRITIC_INPUTS[0]], outputs=CRITIC_OUTPUTS)  # advantage first, then value
    obs = np.arange(8, dtype=np.float32).reshape(2, 4)
    outputs = load_model(package.path).infer({"obs": obs})
    np.testing.assert_array_equal(outputs["value"], obs.sum(1))
    np.testing.assert_array_equal(outputs["advantage"], obs[:, :2] * 2)


def _package(kind, tmp_path, source):
    target = str(tmp_path / "p")
    if kind == "torchscript":
        return ope.package_torchscript(target, source, name="p", inputs=CRITIC_INPUTS,
                                       outputs=CRITIC_OUTPUTS)
    if kind == "torch_export":
        return ope.package_torch_export(target, source, name="p", inputs=CRITIC_INPUTS,
                                        outputs=CRITIC_OUTPUTS)
    return ope.package_torch_package(target, source, "scorer", "model.pkl", name="p",
                                     inputs=CRITIC_INPUTS, outputs=CRITIC_OUTPUTS)


@pytest.mark.parametrize("given, function, described, advice", [
    ("torch_package", "torchscript", "a torch.package archive", "package_torch_package"),
    ("torch_package", "torch_export", "a torch.package archive", "package_torch_package"),
    ("torchscript", "torch_export", "a TorchScript archive", "package_torchscript"),
    ("torch_export", "torchscript", "a torch.export program", "package_torch_export"),
    ("torch_export", "torch_package", "a torch.export program", "package_torch_export"),
])
def test_a_file_of_another_format_is_refused_naming_it(tmp_path, files, given, function,
                                                         described, advice):
    with pytest.raises(PackageError) as caught:
        _package(function, tmp_path, files[given])
    message = str(caught.value)
    assert message.startswith(f"{files[given]} looks like {described}")
    assert f"ope.package_{function} does not take" in message and f"ope.{advice}" in message
    assert not os.path.exists(tmp_path / "p")


@pytest.mark.parametrize("function", ["torchscript", "torch_export", "torch_package"])
def test_an_unreadable_file_is_refused_naming_the_callers_path(tmp_path, files, function):
    with pytest.raises(PackageError, match=f"cannot load {files['garbage']} as a") as caught:
        _package(function, tmp_path, files["garbage"])
    assert "staging" not in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_a_torch_checkpoint_is_refused_as_weights(tmp_path):
    checkpoint = str(tmp_path / "weights.pt")
    torch.save(models.GatedPolicy().state_dict(), checkpoint)
    with pytest.raises(PackageError, match=rf"{checkpoint} looks like a torch.save checkpoint"):
        _package("torch_export", tmp_path, checkpoint)
