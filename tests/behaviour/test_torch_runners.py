"""The torch runners beyond TorchScript through the public API, in both modes: torch.export
programs (and their AOTInductor builds), eager models in torch.package archives, and what
every torch runner shares: binding outputs by name, devices, threads, the framework report,
and refusing model files of another format, naming the caller's path."""

import collections
import os

import numpy as np
import pytest
import torch

import ope
from ope import EnvError, ModelError, PackageError, SpecError, TensorSpec, WorkerCrashed

import models
import torch_models
from torch_models import CRITIC_INPUTS, CRITIC_OUTPUTS, MAX_BATCH, TRIP_ABORT, TRIP_RAISE


def critic_inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return {"obs": rng.normal(size=(batch, 4)).astype(np.float32),
            "scale": rng.uniform(0.5, 2, size=(batch, 1)).astype(np.float32)}


def package_critic(root, name, program=None, **options):
    example = critic_inputs(3, seed=1)
    return ope.package_torch_export(
        os.path.join(root, name), torch_models.export_critic() if program is None else program,
        name=name, inputs=CRITIC_INPUTS, outputs=CRITIC_OUTPUTS, test_inputs=example,
        test_outputs=torch_models.critic_reference(example), **options)


@pytest.fixture(scope="module")
def critic(package_root):
    return package_critic(str(package_root), "critic")


@pytest.fixture(scope="module")
def scorer(package_root):
    return torch_models.torch_package_model(str(package_root))


# --- torch.export ------------------------------------------------------------------------------

def test_torch_export_matches_the_module_at_another_batch_size(load_model, critic):
    assert critic.runner == "torch_export" and critic.requires == {"torch": ""}
    model = load_model(critic.path)
    for batch in (1, 7, MAX_BATCH):  # exported with a batch of 2
        inputs = critic_inputs(batch, seed=batch)
        outputs = model.infer(inputs)
        assert list(outputs) == ["advantage", "value"]  # the specs' order, bound by name
        for name, expected in torch_models.critic_reference(inputs).items():
            np.testing.assert_array_equal(outputs[name], expected)


def test_torch_export_program_taking_keywords_or_from_a_file(load_model, tmp_path):
    saved = str(tmp_path / "critic.pt2")
    torch.export.save(torch_models.export_critic(), saved)
    by_file = package_critic(str(tmp_path), "from-file", saved)
    by_keyword = package_critic(str(tmp_path), "keywords",
                                torch_models.export_critic(as_keywords=True))
    inputs = critic_inputs(5)
    expected = torch_models.critic_reference(inputs)
    for package in (by_file, by_keyword):
        outputs = load_model(package.path).infer(inputs)
        np.testing.assert_array_equal(outputs["value"], expected["value"])


def test_torch_export_bad_inputs_are_spec_errors(load_model, critic):
    model = load_model(critic.path)
    good = critic_inputs(2)
    with pytest.raises(SpecError, match="obs"):
        model.infer({**good, "obs": good["obs"].astype(np.float64)})
    with pytest.raises(SpecError, match="batch"):
        model.infer({**good, "scale": np.ones((3, 1), np.float32)})
    with pytest.raises(SpecError, match="scale"):
        model.infer({"obs": good["obs"]})


def test_torch_export_guard_failure_is_a_model_error(load_model, critic):
    model = load_model(critic.path)
    with pytest.raises(ModelError, match="critic"):
        model.infer(critic_inputs(MAX_BATCH + 1))  # outside the program's Dim
    assert model.infer(critic_inputs(2))["value"].shape == (2,)  # still serves


def test_torch_export_inputs_must_be_the_specs_names(tmp_path):
    renamed = [TensorSpec("observation", "float32", ("batch", 4)), CRITIC_INPUTS[1]]
    with pytest.raises(PackageError, match=r"takes the inputs \(obs, scale\).*observation"):
        ope.package_torch_export(str(tmp_path / "p"), torch_models.export_critic(), name="p",
                                 inputs=renamed, outputs=CRITIC_OUTPUTS)
    assert not os.path.exists(tmp_path / "p")


@pytest.mark.parametrize("program, obs_shape, complaint", [
    ("static", ("batch", 4), r"input 'obs' dim 0: the spec lets it vary .*static, size 2"),
    ("static", (3, 4), r"input 'obs' dim 0: the spec fixes size 3, .*exported with size 2"),
    ("dynamic", (MAX_BATCH + 4, 4), rf"input 'obs' dim 0: .*fixes size 20, .*sizes 1 to "
                                    rf"{MAX_BATCH}"),
    ("dynamic", ("batch", 5), r"input 'obs' dim 1: the spec fixes size 5, .*size 4"),
    ("dynamic", ("batch", 4, 1), r"input 'obs': the spec has rank 3"),
])
def test_torch_export_specs_are_checked_against_the_program_shapes(tmp_path, program,
                                                                   obs_shape, complaint):
    exported = torch_models.export_critic(dynamic=(program == "dynamic"))
    inputs = [TensorSpec("obs", "float32", obs_shape), CRITIC_INPUTS[1]]
    with pytest.raises(SpecError, match=complaint):
        ope.package_torch_export(str(tmp_path / "p"), exported, name="p", inputs=inputs,
                                 outputs=CRITIC_OUTPUTS)


def test_torch_export_spec_dtype_is_checked(tmp_path):
    inputs = [TensorSpec("obs", "float64", ("batch", 4)), CRITIC_INPUTS[1]]
    with pytest.raises(SpecError, match="input 'obs': the spec says float64.*float32"):
        ope.package_torch_export(str(tmp_path / "p"), torch_models.export_critic(), name="p",
                                 inputs=inputs, outputs=CRITIC_OUTPUTS)


@pytest.mark.slow
def test_torch_export_aot_runs_the_compiled_program(load_model, tmp_path):
    package = package_critic(str(tmp_path), "aot", aot=True)
    assert package.config["aot"] and package.config["aot_device"] == "cpu"
    model = load_model(package.path)
    inputs = critic_inputs(9)
    for name, expected in torch_models.critic_reference(inputs).items():
        np.testing.assert_allclose(model.infer(inputs)[name], expected, rtol=1e-5, atol=1e-6)
    assert model.stats()["worker"]["runner"] == "torch_export"


# --- torch.package -----------------------------------------------------------------------------

def test_torch_package_matches_the_module(load_model, scorer):
    package, eager = scorer
    assert package.runner == "torch_package" and package.requires == {"torch": ""}
    model = load_model(package.path)
    for batch in (1, 2, 9):
        x = np.random.default_rng(batch).normal(size=(batch, 3)).astype(np.float32)
        with torch.no_grad():
            expected = eager(torch.from_numpy(x), torch.tensor(0)).numpy()
        np.testing.assert_array_equal(model.infer({"x": x, "trip": np.int64(0)})["scores"],
                                      expected)


def test_torch_package_errors(load_model, scorer):
    model = load_model(scorer[0].path)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(SpecError, match="trip"):
        model.infer({"x": x, "trip": np.float32(0)})
    with pytest.raises(ModelError, match="Tripwire") as caught:
        model.infer({"x": x, "trip": np.int64(TRIP_RAISE)})
    assert "tripped on a batch of 2" in str(caught.value)
    assert model.infer({"x": x, "trip": np.int64(0)})["scores"].shape == (2, 2)


def test_torch_package_crash_is_worker_crashed(scorer):
    with ope.load(scorer[0].path, out_of_process=True) as model:
        with pytest.raises(WorkerCrashed):
            model.infer({"x": np.ones((1, 3), np.float32), "trip": np.int64(TRIP_ABORT)})
        assert model.infer({"x": np.ones((1, 3), np.float32),
                            "trip": np.int64(0)})["scores"].shape == (1, 2)


def test_torch_package_checks_the_resource_and_its_signature(tmp_path):
    archive, _ = torch_models.torch_package_archive(str(tmp_path))
    with pytest.raises(PackageError, match=rf"cannot load {archive} as a torch.package"):
        ope.package_torch_package(str(tmp_path / "p"), archive, "scorer", "missing.pkl",
                                  name="p", inputs=torch_models.TORCH_PACKAGE_INPUTS,
                                  outputs=torch_models.TORCH_PACKAGE_OUTPUTS)
    with pytest.raises(PackageError, match="cannot be called with the inputs x, mode"):
        ope.package_torch_package(str(tmp_path / "p"), archive, "scorer", "model.pkl",
                                  name="p", inputs=[torch_models.TORCH_PACKAGE_INPUTS[0],
                                                    TensorSpec("mode", "int64", ())],
                                  outputs=torch_models.TORCH_PACKAGE_OUTPUTS)
