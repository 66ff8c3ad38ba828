"""Keras 3 models on the torch backend, in both modes: results as keras computes them, input
specs read from the model's keras.Input layers (the batch as a symbol every tensor shares),
dict, list and single inputs and outputs, typed errors, and the backend recorded in the
package and set in the worker before keras is imported there.

Needs keras (``pip install keras`` without its torch dependency: torch is the host's own);
without it these tests skip, saying so; with ``CI=true`` they fail instead.
"""

import os

import numpy as np
import pytest

import ope
from ope import ModelError, PackageError, RequirementError, SpecError, TensorSpec

import models

os.environ.setdefault("KERAS_BACKEND", "torch")
try:
    import keras
except ImportError as error:
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip(f"keras is not installed ({error})", allow_module_level=True)

if keras.backend.backend() != "torch":
    pytest.skip(f"keras runs on {keras.backend.backend()!r} here; these tests use torch",
                allow_module_level=True)

RNG = np.random.default_rng(7)


def batch(n, width=4, dtype=np.float32):
    return RNG.standard_normal((n, width)).astype(dtype)


def direct(model, inputs):
    """What keras itself computes, as numpy."""
    result = model(inputs, training=False)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, result)


def dict_model():
    """Two named inputs in a dict, two named outputs in a dict."""
    keras.utils.set_random_seed(1)
    x, y = keras.Input((4,), name="x"), keras.Input((4,), name="y")
    hidden = keras.layers.Dense(8, activation="tanh")(keras.layers.Concatenate()([x, y]))
    scores = keras.layers.Dense(3, name="dense_out")(hidden)
    return keras.Model({"x": x, "y": y}, {"scores": scores, "total": keras.ops.sum(scores, -1)})


def list_model():
    """Two inputs in a list, two outputs in a list (bound in spec order)."""
    keras.utils.set_random_seed(2)
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    joined = keras.layers.Concatenate()([keras.layers.Dense(3)(a), b])
    return keras.Model([a, b], [keras.layers.Dense(2)(joined), keras.ops.max(joined, -1)])


def sequential_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((4,), name="features"), keras.layers.Dense(5),
                             keras.layers.ReLU()])


DICT_OUTPUTS = [TensorSpec("scores", "float32", ("batch", 3)),
                TensorSpec("total", "float32", ("batch",))]


@pytest.fixture(scope="module")
def dict_keras():
    return dict_model()


@pytest.fixture(scope="module")
def dict_package(package_root, dict_keras):
    return ope.package_keras(os.path.join(package_root, "keras-dict"), dict_keras,
                             name="keras-dict", outputs=DICT_OUTPUTS)


def test_results_equal_keras_and_the_batch_is_a_symbol(load_model, dict_keras, dict_package):
    model = load_model(dict_package.path)
    for n in (1, 5):
        inputs = {"x": batch(n), "y": batch(n)}
        outputs, expected = model.infer(inputs), direct(dict_keras, inputs)
        assert outputs["scores"].shape == (n, 3)
        np.testing.assert_allclose(outputs["scores"], expected["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outputs["total"], expected["total"], rtol=1e-5, atol=1e-5)
    with pytest.raises(SpecError, match="batch"):
        model.infer({"x": batch(2), "y": batch(3)})


def test_inputs_are_read_from_the_model(dict_package):
    assert [(s.name, s.dtype, s.shape) for s in dict_package.inputs] == [
        ("x", "float32", ("batch", 4)), ("y", "float32", ("batch", 4))]


def test_backend_and_requirements_are_recorded(dict_package):
    assert dict_package.config["backend"] == "torch"
    assert dict_package.requires == {"keras": "", "torch": ""}


def test_bad_inputs_are_spec_errors(load_model, dict_package):
    model = load_model(dict_package.path)
    with pytest.raises(SpecError, match="'y'"):
        model.infer({"x": batch(2)})
    with pytest.raises(SpecError, match="float32"):
        model.infer({"x": batch(2, dtype=np.float64), "y": batch(2)})
    with pytest.raises(SpecError, match="'x'"):
        model.infer({"x": batch(2, width=5), "y": batch(2)})


@pytest.fixture(scope="module")
def loose_package(package_root, dict_keras):
    """Specs that let any width through: the model's own Dense layer refuses width 5."""
    loose = [TensorSpec(n, "float32", ("batch", None)) for n in ("x", "y")]
    return ope.package_keras(os.path.join(package_root, "keras-loose"), dict_keras,
                             name="keras-loose", inputs=loose, outputs=DICT_OUTPUTS)


def test_model_error_is_a_model_error(load_model, loose_package, dict_keras):
    model = load_model(loose_package.path)
    with pytest.raises(ModelError, match="keras-loose"):
        model.infer({"x": batch(2, width=5), "y": batch(2, width=5)})
    inputs = {"x": batch(2), "y": batch(2)}  # the model goes on serving
    np.testing.assert_allclose(model.infer(inputs)["total"], direct(dict_keras, inputs)["total"],
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def list_package(package_root):
    keras_model = list_model()
    return keras_model, ope.package_keras(
        os.path.join(package_root, "keras-list"), keras_model, name="keras-list",
        outputs=[TensorSpec("projected", "float32", ("batch", 2)),
                 TensorSpec("peak", "float32", ("batch",))])


def test_list_inputs_and_outputs(load_model, list_package):
    keras_model, package = list_package
    assert [s.name for s in package.inputs] == ["a", "b"]
    inputs = {"a": batch(3), "b": batch(3, width=2)}
    expected = direct(keras_model, [inputs["a"], inputs["b"]])
    outputs = load_model(package.path).infer(inputs)
    np.testing.assert_allclose(outputs["projected"], expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["peak"], expected[1], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sequential_package(package_root, tmp_path_factory):
    """From a .keras file, with test data: self-checked before it exists."""
    keras_model, features = sequential_model(), batch(4)
    saved = tmp_path_factory.mktemp("keras") / "sequential.keras"
    keras_model.save(saved)
    return keras_model, ope.package_keras(
        os.path.join(package_root, "keras-sequential"), str(saved),
        name="keras-sequential", outputs=[TensorSpec("activations", "float32", ("batch", 5))],
        test_inputs={"features": features},
        test_outputs={"activations": direct(keras_model, features)})


def test_sequential_model_from_a_keras_file(load_model, sequential_package):
    keras_model, package = sequential_package
    features = batch(4)
    assert [(s.name, s.shape) for s in package.inputs] == [("features", ("batch", 4))]
    outputs = load_model(package.path).infer({"features": features})
    np.testing.assert_allclose(outputs["activations"], direct(keras_model, features),
                               rtol=1e-5, atol=1e-6)


def test_a_self_check_that_fails_leaves_no_package(package_root, dict_keras):
    inputs = {"x": batch(2), "y": batch(2)}
    wrong = {name: value + 1 for name, value in direct(dict_keras, inputs).items()}
    path = os.path.join(package_root, "keras-wrong")
    with pytest.raises(PackageError, match="differ"):
        ope.package_keras(path, dict_keras, name="keras-wrong", outputs=DICT_OUTPUTS,
                          test_inputs=inputs, test_outputs=wrong)
    assert not os.path.exists(path)


def test_worker_sets_the_recorded_backend(dict_package):
    # The worker's inherited KERAS_BACKEND says jax; the package says torch, and torch it is.
    with ope.load(dict_package.path, out_of_process=True,
                  env_vars={"KERAS_BACKEND": "jax"}) as model:
        worker = model.stats()["worker"]
        model.infer({"x": batch(1), "y": batch(1)})
    assert (worker["framework"], worker["keras_backend"]) == ("keras", "torch")
    assert worker["framework_version"] == keras.__version__


def test_another_backend_is_a_requirement_of_the_package(package_root, dict_keras):
    package = ope.package_keras(os.path.join(package_root, "keras-jax"), dict_keras,
                                name="keras-jax", backend="jax", outputs=DICT_OUTPUTS)
    assert package.requires == {"keras": "", "jax": ""}
    with pytest.raises(RequirementError, match="jax"):
        ope.load(package.path, out_of_process=False)


def test_unknown_backend_is_refused(package_root, dict_keras):
    with pytest.raises(PackageError, match="backend must be one of"):
        ope.package_keras(os.path.join(package_root, "keras-theano"), dict_keras,
                          name="keras-theano", backend="theano", outputs=DICT_OUTPUTS)


def test_wrong_format_is_refused_naming_the_path(package_root, gated, tmp_path):
    torchscript = gated.model_file
    with pytest.raises(PackageError, match=f"{torchscript}.*TorchScript.*package_torchscript"):
        ope.package_keras(os.path.join(package_root, "keras-from-ts"), torchscript,
                          name="keras-from-ts", outputs=DICT_OUTPUTS)
    garbage = tmp_path / "not-a-model.keras"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(PackageError, match=f"{garbage} is not a Keras 3 .keras file"):
        ope.package_keras(os.path.join(package_root, "keras-garbage"), str(garbage),
                          name="keras-garbage", outputs=DICT_OUTPUTS)


def test_a_legacy_h5_file_is_refused_with_advice(package_root, dict_keras, tmp_path):
    legacy = tmp_path / "legacy.h5"
    dict_keras.save(legacy)
    with pytest.raises(PackageError, match=f"{legacy} looks like an HDF5 file.*save it as .keras"):
        ope.package_keras(os.path.join(package_root, "keras-h5"), str(legacy),
                          name="keras-h5", outputs=DICT_OUTPUTS)


def test_a_model_object_of_another_kind_is_refused(package_root):
    with pytest.raises(PackageError, match="expected a Keras 3 model"):
        ope.package_keras(os.path.join(package_root, "keras-not"), models.GatedPolicy(),
                          name="keras-not", outputs=DICT_OUTPUTS)
