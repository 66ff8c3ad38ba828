"""Packages of every kind through the public API: build, self-check, load, infer; and
every way a package can be broken, each refused with a typed error that says what is wrong."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

import ope
import ope.cli
from ope import ModelError, PackageError, RequirementError, SpecError, TensorSpec
from ope.requirements import check_requirements

import models

pytestmark = models.USES_TORCHSCRIPT


# --- the three kinds ---------------------------------------------------------------------------

def test_numpy_package_with_data_dir(load_model, affine):
    assert affine.runner == "python" and affine.framework == "numpy"
    assert affine.requires == {}
    model = load_model(affine.path)
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(model.infer({"x": x})["y"], models.affine_reference(x), rtol=1e-6)
    assert model.name == "affine" and model.inputs == affine.inputs


def test_torchscript_package_keeps_data_dependent_control_flow(load_model, gated):
    assert gated.runner == "torchscript" and gated.requires == {"torch": ""}
    model = load_model(gated.path)
    eager = models.GatedPolicy().eval()
    obs = torch.linspace(-2, 2, 8).reshape(2, 4)
    loops = set()
    for gain in (0.1, 3.0, 50.0, -4.0):
        gain = torch.tensor(gain)
        outputs = model.infer({"obs": obs, "gain": gain})
        with torch.no_grad():
            expected = eager(obs, gain)
        np.testing.assert_allclose(outputs["logits"], expected["logits"].numpy(), rtol=1e-5)
        assert int(outputs["loops"]) == int(expected["loops"])
        loops.add(int(outputs["loops"]))
    assert len(loops) > 1, "the inputs should take different paths through the while loop"


def test_eager_torch_package_gets_tensors(load_model, eager):
    assert eager.framework == "torch" and eager.requires == {"torch": ""}
    model = load_model(eager.path)
    x = np.ones((3, 3), np.float32)
    mask = np.array([True, True, False])
    y = model.infer({"x": x, "mask": mask})["y"]
    np.testing.assert_allclose(y, models.eager_torch_reference(x, mask), rtol=1e-6)
    assert isinstance(y, np.ndarray)


def test_read_only_inputs_reach_torch_models(load_model, eager):
    model = load_model(eager.path)
    x = np.ones((2, 3), np.float32)
    x.flags.writeable = False
    assert model.infer({"x": x, "mask": np.array([True, False])})["y"].shape == (2, 2)


def test_placeholder_returns_random_outputs_per_spec(load_model, placeholder):
    assert placeholder.runner == "placeholder"
    model = load_model(placeholder.path)
    outputs = model.infer({"x": np.zeros((5, 4), np.float32)})
    assert outputs["scores"].shape == (5, 3) and outputs["scores"].dtype == np.float32
    assert outputs["ids"].shape[0] == 5 and outputs["ids"].dtype == np.int32
    assert outputs["flags"].shape == (2,) and outputs["flags"].dtype == bool
    assert outputs["names"].shape == (5,) and outputs["names"].dtype.kind == "U"


def test_package_records_specs_and_files(affine):
    reread = ope.read_package(affine.path)
    assert reread.inputs == (TensorSpec("x", "float32", ("batch", 4)),)
    assert reread.config["format_version"] == 1
    assert {"config.json", "code/model.py", "data/weight.npy", "data/bias.npy",
            "test_data/inputs.npz", "test_data/outputs.npz"} == set(reread.files)
    np.testing.assert_array_equal(reread.test_inputs()["x"],
                                  np.arange(8, dtype=np.float32).reshape(2, 4))


def test_a_package_is_pinned_by_its_manifests_digest(tmp_path, affine):
    path = copy_of(affine, tmp_path)
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    assert affine.manifest_digest == digest
    assert ope.read_package(path, manifest_digest=digest).manifest_digest == digest
    edit_config(path, name="renamed")
    rehash(path)
    with pytest.raises(PackageError, match=f"package at {path} changed on disk since it was "
                                           f"loaded \\(manifest digest: expected {digest[:16]}"):
        ope.read_package(path, manifest_digest=digest)


def test_loading_writes_nothing_into_the_package(load_model, affine):
    load_model(affine.path).infer({"x": np.zeros((1, 4), np.float32)})
    ope.read_package(affine.path)  # no __pycache__ or other new file: the manifest still holds


def test_same_module_name_in_two_packages_stays_separate(tmp_path, load_model):
    spec = [TensorSpec("x", "int64", ())]
    out = [TensorSpec("y", "int64", ())]
    source = "def factory(d):\n    return lambda x: {{'y': x + {}}}\n"
    one = models.numpy_package(str(tmp_path), source.format(1), name="one", inputs=spec, outputs=out)
    two = models.numpy_package(str(tmp_path), source.format(2), name="two", inputs=spec, outputs=out)
    x = np.array(10)
    assert int(load_model(one.path).infer({"x": x})["y"]) == 11
    assert int(load_model(two.path).infer({"x": x})["y"]) == 12


# --- self-check at packaging time ----------------------------------------------------------

def test_self_check_mismatch_names_the_tensor_and_leaves_nothing(tmp_path):
    x = np.zeros((1, 4), np.float32)
    with pytest.raises(PackageError, match="output 'y': values differ"):
        models.affine_package(str(tmp_path), test_inputs={"x": x},
                              test_outputs={"y": models.affine_reference(x) + 1})
    assert not os.path.exists(tmp_path / "affine")
    assert not [p for p in os.listdir(tmp_path) if "staging" in p]


def test_self_check_catches_wrong_torchscript_outputs(tmp_path):
    eager = models.GatedPolicy().eval()
    module = torch.jit.script(eager)
    obs = np.zeros((1, 4), np.float32)
    with torch.no_grad():
        logits = eager(torch.from_numpy(obs), torch.tensor(1.0))["logits"].numpy()
    with pytest.raises(PackageError, match="output 'loops': 1 of 1 values differ"):
        ope.package_torchscript(
            tmp_path / "bad", module, name="bad",
            inputs=[TensorSpec("obs", "float32", ("b", 4)), TensorSpec("gain", "float32", ())],
            outputs=[TensorSpec("logits", "float32", ("b", 2)), TensorSpec("loops", "int64", ())],
            test_inputs={"obs": obs, "gain": np.float32(1)},
            test_outputs={"logits": logits, "loops": np.array(99)})


def test_test_data_must_fit_the_spec(tmp_path):
    with pytest.raises(SpecError, match="input 'x': expected dtype float32, got float64"):
        models.affine_package(str(tmp_path), test_inputs={"x": np.zeros((1, 4))},
                              test_outputs={"y": np.zeros((1, 3), np.float32)})


def test_test_inputs_need_test_outputs(tmp_path):
    with pytest.raises(PackageError, match="both test_inputs and test_outputs"):
        models.affine_package(str(tmp_path), test_inputs={"x": np.zeros((1, 4), np.float32)},
                              test_outputs=None)


def test_model_raising_during_self_check_is_a_model_error(tmp_path):
    source = "def factory(d):\n    def run(x):\n        raise KeyError('nope')\n    return run\n"
    with pytest.raises(ModelError, match="KeyError"):
        models.numpy_package(str(tmp_path), source, name="raiser",
                             inputs=[TensorSpec("x", "int8", ())],
                             outputs=[TensorSpec("y", "int8", ())],
                             test_inputs={"x": np.int8(1)}, test_outputs={"y": np.int8(1)})
    assert not os.path.exists(tmp_path / "raiser")


# --- refused at packaging time -----------------------------------------------------------------

def test_existing_destination_is_refused(tmp_path, affine):
    with pytest.raises(PackageError, match="already exists"):
        ope.package_placeholder(affine.path, name="again", inputs=[], outputs=[])


def test_torchscript_signature_must_match_inputs(tmp_path):
    module = torch.jit.script(models.GatedPolicy().eval())
    with pytest.raises(PackageError, match=r"forward\(obs, gain\) does not take exactly"):
        ope.package_torchscript(tmp_path / "p", module, name="p",
                                inputs=[TensorSpec("observation", "float32", ("b", 4)),
                                        TensorSpec("gain", "float32", ())],
                                outputs=[TensorSpec("logits", "float32", ("b", 2))])


def test_eager_module_is_not_torchscript(tmp_path):
    with pytest.raises(PackageError, match="expected a TorchScript module"):
        ope.package_torchscript(tmp_path / "p", models.GatedPolicy(), name="p",
                                inputs=[], outputs=[])


@pytest.mark.parametrize("entrypoint", ["model", "model:", "model:2x", "a-b:factory", None])
def test_malformed_entrypoint_is_refused(tmp_path, entrypoint):
    with pytest.raises(PackageError, match="entrypoint must look like"):
        ope.package_python(tmp_path / "p", name="p", code_dir=str(tmp_path), entrypoint=entrypoint,
                           inputs=[], outputs=[])


def test_invalid_requirement_specifier_is_refused(tmp_path):
    with pytest.raises(PackageError, match="requirement 'numpy': '~~2' is not a PEP 440"):
        models.numpy_package(str(tmp_path), "def factory(d): pass\n", name="p", inputs=[],
                             outputs=[], requires={"numpy": "~~2"})


@pytest.mark.parametrize("source, error, message", [
    ("", PackageError, "not a callable in model"),
    ("factory = 3\n", PackageError, "not a callable in model"),
    ("def factory(d):\n    return 3\n", PackageError, "factory returned int"),
    ("def factory(d):\n    raise RuntimeError('no weights')\n", ModelError, "in its factory"),
    ("import no_such_module_for_ope_tests\n", ModelError, "while importing its code"),
])
def test_broken_python_code_fails_to_load(tmp_path, load_model, source, error, message):
    package = models.numpy_package(str(tmp_path), source, name="broken",
                                   inputs=[TensorSpec("x", "int8", ())],
                                   outputs=[TensorSpec("y", "int8", ())])
    with pytest.raises(error, match=message):
        load_model(package.path)


def test_missing_entrypoint_module_is_a_package_error(tmp_path, load_model):
    package = models.numpy_package(str(tmp_path), "", name="p", module="other",
                                   inputs=[], outputs=[])
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["entrypoint"] == "other:factory"
    shutil.move(tmp_path / "p" / "code" / "other.py", tmp_path / "p" / "code" / "gone.py")
    rehash(tmp_path / "p")
    with pytest.raises(PackageError, match="module 'other' is not in the package's code/"):
        load_model(package.path)


def test_missing_entrypoint_submodule_is_a_package_error(tmp_path, load_model):
    code_dir = models.write_code(str(tmp_path), "def factory(d):\n    return dict\n")
    package = ope.package_python(tmp_path / "p", name="p", code_dir=code_dir,
                                 entrypoint="model.gone:factory", inputs=[], outputs=[])
    with pytest.raises(PackageError, match="entrypoint module 'model.gone' not found"):
        load_model(package.path)


# --- corrupt and incomplete packages -------------------------------------------------------

def copy_of(package, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(package.path, target)
    return target


def rehash(path):
    """Rewrite the manifest to match the folder: models a hand-edited package."""
    files = {str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
             for file in path.rglob("*") if file.is_file() and file.name != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: (p / "data" / "weight.npy").write_bytes(b"tampered"),
     "hash mismatch for data/weight.npy"),
    (lambda p: (p / "code" / "model.py").unlink(), r"missing file\(s\) code/model.py"),
    (lambda p: (p / "code" / "extra.py").write_text("x = 1\n"),
     r"unexpected file\(s\) code/extra.py"),
    (lambda p: (p / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda p: (p / "manifest.json").write_text("[]"), "manifest.json is malformed"),
    (lambda p: edit_config(p, format_version=2), "format version 2 is not supported"),
    (lambda p: edit_config(p, format="other"), "is not an ope package config"),
    (lambda p: edit_config(p, name="renamed"), "hash mismatch for config.json"),
    (lambda p: (edit_config(p, runner="no_such_runner"), rehash(p)), "'runner' must be one of"),
    (lambda p: (edit_config(p, inputs=[{"name": "x", "dtype": "complex64", "shape": []}]),
                rehash(p)), "unknown dtype 'complex64'"),
    (lambda p: (edit_config(p, requires=["numpy"]), rehash(p)), "'requires' must map"),
    (lambda p: (edit_config(p, entrypoint="model"), rehash(p)), "entrypoint must look like"),
    (lambda p: shutil.rmtree(p), "no model package at"),
])
def test_corrupt_package_is_refused(tmp_path, load_model, affine, corrupt, message):
    path = copy_of(affine, tmp_path)
    corrupt(path)
    assert_refused(path, load_model, message)


def assert_refused(path, load_model, message):
    """Reading the package at ``path``, and loading it, both raise PackageError matching
    ``message``."""
    with pytest.raises(PackageError, match=message):
        ope.read_package(path)
    with pytest.raises(PackageError, match=message):
        load_model(str(path))


def test_corrupt_torchscript_file_is_a_package_error(tmp_path, load_model, gated):
    path = copy_of(gated, tmp_path)
    (path / "model.pt").write_bytes(b"not a zip")
    rehash(path)
    with pytest.raises(PackageError, match="cannot load its TorchScript file model.pt"):
        load_model(str(path))


# --- links and code from outside the package ---------------------------------------------------

def outside_code(tmp_path, answer="x * 0"):
    """A folder outside any package holding a package ``model`` (which, linked into code/,
    would be imported before code/model.py)."""
    folder = tmp_path / "outside" / "model"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(f"def factory(d):\n    return lambda x: {{'y': {answer}}}\n")
    return folder


def link_outside_copy(path, relative):
    """Replace ``relative`` by a link to an identical copy outside: every hash still matches."""
    outside = path.parent / "outside-copy"
    outside.mkdir()
    shutil.copy(path / relative, outside / "file")
    (path / relative).unlink()
    (path / relative).symlink_to(outside / "file")


@pytest.mark.parametrize("change, entry, message", [
    (lambda p, t: (p / "code" / "model").symlink_to(outside_code(t), target_is_directory=True),
     "code/model", "is a symbolic link"),
    (lambda p, t: link_outside_copy(p, "code/model.py"), "code/model.py", "is a symbolic link"),
    (lambda p, t: link_outside_copy(p, "data/weight.npy"), "data/weight.npy", "is a symbolic link"),
    (lambda p, t: ((p / "code" / "alias.py").symlink_to("model.py"), rehash(p)), "code/alias.py",
     "is a symbolic link"),
    (lambda p, t: os.mkfifo(p / "code" / "pipe"), "code/pipe", "is not a regular file or folder"),
])
def test_a_link_or_special_file_in_a_package_is_refused(tmp_path, load_model, affine, change,
                                                        entry, message):
    path = copy_of(affine, tmp_path)
    change(path, tmp_path)
    assert_refused(path, load_model, f"package {path}: {entry} {message}")


def test_ope_check_refuses_a_package_with_a_link(tmp_path, capsys, affine):
    path = copy_of(affine, tmp_path)
    (path / "code" / "model").symlink_to(outside_code(tmp_path), target_is_directory=True)
    assert ope.cli.main(["check", str(path)]) == 1
    assert "code/model is a symbolic link" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["code_dir", "data_dir"])
def test_packaging_refuses_a_link_in_the_folders_it_copies(tmp_path, what):
    folders = {what: tmp_path / what for what in ("code_dir", "data_dir")}
    for folder in folders.values():
        folder.mkdir()
    (folders["code_dir"] / "model.py").write_text("def factory(d):\n    return dict\n")
    (folders[what] / "linked").symlink_to(outside_code(tmp_path), target_is_directory=True)
    with pytest.raises(PackageError, match=f"{what} '{folders[what]}': linked is a symbolic link"):
        ope.package_python(tmp_path / "p", name="p", entrypoint="model:factory", inputs=[],
                           outputs=[], **{key: str(folder) for key, folder in folders.items()})
    assert sorted(os.listdir(tmp_path)) == ["code_dir", "data_dir", "outside"]


@pytest.mark.parametrize("entrypoint", ["json:loads", "os:getcwd"])
def test_an_entrypoint_outside_the_packages_code_is_refused(tmp_path, load_model, affine,
                                                            entrypoint):
    code_dir = models.write_code(str(tmp_path), "def factory(d):\n    return dict\n")
    top = entrypoint.partition(":")[0]
    with pytest.raises(PackageError, match=f"entrypoint '{entrypoint}': module '{top}' is not "
                                           f"in code_dir '{code_dir}'"):
        ope.package_python(tmp_path / "p", name="p", code_dir=code_dir, entrypoint=entrypoint,
                           inputs=[], outputs=[])
    assert not [name for name in os.listdir(tmp_path) if name.startswith(("p", ".p"))]
    path = copy_of(affine, tmp_path)
    edit_config(path, entrypoint=entrypoint)
    rehash(path)
    expected = f"entrypoint '{entrypoint}': module '{top}' is not in the package's code/"
    with pytest.raises(PackageError, match=expected):
        ope.read_package(path)
    with pytest.raises(PackageError, match=expected):
        load_model(str(path))


def test_an_entrypoint_module_imported_from_elsewhere_is_refused(tmp_path, load_model):
    # code/sys.py passes the check of the package's files, but the builtin sys comes first.
    package = models.numpy_package(str(tmp_path), "def factory(d):\n    return dict\n",
                                   name="p", module="sys", inputs=[], outputs=[])
    assert package.entrypoint == "sys:factory"
    with pytest.raises(PackageError, match="entrypoint 'sys:factory': module 'sys' was imported "
                                           "from no file, not from the package's code/"):
        load_model(package.path)


# --- requirements ------------------------------------------------------------------------------

@pytest.mark.parametrize("requires, message", [
    ({"numpy": "<2"}, f"numpy<2: found {np.__version__}"),
    ({"python": "<3"}, "python<3: found 3."),
    ({"ope-no-such-distribution": ""}, r"ope-no-such-distribution \(any version\): not installed"),
])
def test_unsatisfied_requirement_is_named(tmp_path, requires, message):
    package = models.numpy_package(str(tmp_path), "def factory(d):\n    return dict\n",
                                   name="needy", inputs=[], outputs=[], lock=False,
                                   requires={"numpy": ">=1", **requires})
    with pytest.raises(RequirementError, match=message) as caught:
        ope.load(package.path, out_of_process=False)
    assert "numpy>=1" not in str(caught.value), "only failing requirements are listed"


def test_satisfied_requirements_load(tmp_path, load_model):
    package = models.numpy_package(str(tmp_path), "def factory(d):\n    return dict\n",
                                   name="fine", inputs=[], outputs=[],
                                   requires={"numpy": ">=1.20", "python": ">=3.8"})
    assert load_model(package.path).infer({}) == {}


def test_check_requirements_with_given_versions():
    versions = {"torch": "2.13.0+cpu", "numpy": "1.26.4", "beta": "3.0b1"}.get
    assert check_requirements({"torch": ">=2.1,<2.14", "beta": ">=2"}, versions) == []
    assert check_requirements({"numpy": ">=2", "gone": ""}, versions) == [
        "numpy>=2: found 1.26.4", "gone (any version): not installed"]


# --- model exceptions --------------------------------------------------------------------------

def test_model_exception_becomes_model_error_and_model_survives(load_model, probe):
    model = load_model(probe.path)
    x = np.ones((2, 2), np.float32)
    with pytest.raises(ModelError) as caught:
        model.infer({"x": x, "behaviour": "raise"})
    error = caught.value
    assert error.error_type == "ProbeFailure"
    assert "probe asked to fail on (2, 2)" in str(error)
    assert "in explode" in error.traceback_text and "Model traceback" in str(error)
    np.testing.assert_array_equal(model.infer({"x": x, "behaviour": "ok"})["y"], x * 2)
    assert model.stats()["errors"] == 1


def test_torchscript_model_error_survives(load_model, gated):
    model = load_model(gated.path)
    with pytest.raises(ModelError, match="raised"):
        model.infer({"obs": np.zeros((0, 4), np.float32), "gain": np.float32(1)})
    assert model.infer({"obs": np.ones((1, 4), np.float32),
                        "gain": np.float32(1)})["logits"].shape == (1, 2)


# What each unruly exception must come back as: (text in the message, text in the traceback).
_UNRULY_TEXTS = {
    "huge_message": ("[truncated 298,", "[truncated "),
    "lone_surrogate": ("bad \\udc80 byte", "bad \\udc80 byte"),
    "str_raises": ("<Unprintable object: its __str__ raised RuntimeError>", "raise Unprintable()"),
    "huge_traceback": ("ValueError while running: deep down", "[truncated "),
}


@pytest.mark.parametrize("kind", sorted(models.UNRULY_EXCEPTIONS))
def test_an_unruly_model_exception_is_a_bounded_model_error_and_serving_goes_on(
        load_model, unruly, kind):
    model = load_model(unruly.path)
    pid = model.health().get("pid")
    with pytest.raises(ModelError) as caught:
        model.infer({"kind": np.int32(models.UNRULY_EXCEPTIONS[kind])})
    error, (in_message, in_traceback) = caught.value, _UNRULY_TEXTS[kind]
    message = ope.OpeError.__str__(error)
    assert in_message in message and len(message) <= ope.errors.MESSAGE_LIMIT
    assert in_traceback in error.traceback_text
    assert len(error.traceback_text) <= ope.errors.TRACEBACK_LIMIT
    assert error.traceback_text.rstrip().endswith(("end", "byte", "deep down", "str() failed>"))
    str(error).encode("utf-8")  # printable and encodable as it is
    assert int(model.infer({"kind": np.int32(0)})["echo"]) == 0
    assert model.health().get("restarts", 0) == 0 and model.health().get("pid") == pid


def test_a_model_raising_unruly_exceptions_again_and_again_stays_usable(load_model, unruly):
    model = load_model(unruly.path)
    for _ in range(10):
        for kind in models.UNRULY_EXCEPTIONS.values():
            with pytest.raises(ModelError):
                model.infer({"kind": np.int32(kind)})
    assert int(model.infer({"kind": np.int32(0)})["echo"]) == 0
    health = model.health()
    assert health.get("restarts", 0) == 0 and health.get("state", "ready") == "ready"
    assert model.stats()["errors"] == 10 * len(models.UNRULY_EXCEPTIONS)


def test_an_unruly_exception_while_loading_is_a_bounded_model_error(tmp_path, load_model):
    source = "def factory(d):\n    raise ValueError('bad \\udc80 ' + 'm' * 300_000)\n"
    package = models.numpy_package(str(tmp_path), source, name="unloadable", inputs=[], outputs=[])
    cut = r"in its factory: bad \\udc80 m+\n\.\.\. \[truncated"
    with pytest.raises(ModelError, match=cut) as caught:
        load_model(package.path)
    assert len(ope.OpeError.__str__(caught.value)) <= ope.errors.MESSAGE_LIMIT
