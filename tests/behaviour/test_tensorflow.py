"""A TensorFlow SavedModel packaged on this host, which has no TensorFlow, and run out of
process in a worker environment that has it: specs read from the SavedModel's signature,
results equal to TensorFlow's own, typed errors.

The environment "tf" (this Python, tensorflow-cpu) is built once and cached under
``$OPE_TEST_HOME`` (default ``~/.cache/ope-tests``), rebuilt only when ope's version or
source fingerprint differs from the one it was built from. Building needs the package
registry: without it these tests skip, saying so; with ``CI=true`` they fail instead.
"""

import os
import platform
import subprocess
import urllib.request

import numpy as np
import pytest

import ope
from ope import EnvError, ModelError, PackageError, SpecError, TensorSpec, envs
from ope.install_policy import load_policy

pytestmark = pytest.mark.slow

CACHE_HOME = os.environ.get("OPE_TEST_HOME") or os.path.expanduser("~/.cache/ope-tests")
ENV_NAME = "tf"
TF_REQUIRES = ["tensorflow-cpu==2.21.*"]
HOST_MINOR = ".".join(platform.python_version_tuple()[:2])

# Run by the environment's Python: saves the SavedModel, then writes TensorFlow's own results
# for the inputs in argv[2] (an .npz) to argv[3].
_MAKE_SAVED_MODEL = '''
import sys

import numpy as np
import tensorflow as tf


class Scorer(tf.Module):
    def __init__(self):
        self.w = tf.Variable(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x"),
                                  tf.TensorSpec([None], tf.int64, name="ids")])
    def serve(self, x, ids):
        tf.debugging.assert_non_negative(ids, message="ids must be >= 0")
        return {"scores": tf.nn.softmax(tf.matmul(x, self.w)), "next_ids": ids + 1}


scorer = Scorer()
tf.saved_model.save(scorer, sys.argv[1], signatures={"serving_default": scorer.serve})
with np.load(sys.argv[2]) as npz:
    result = scorer.serve(**{name: tf.constant(npz[name]) for name in npz.files})
np.savez(sys.argv[3], **{name: value.numpy() for name, value in result.items()})
'''


@pytest.fixture(scope="module")
def tf_env(tmp_path_factory):
    """The cached "tf" environment, (re)built when out of date, under a policy that forbids
    torch (a registry torch brings gigabytes of CUDA libraries)."""
    policy = tmp_path_factory.mktemp("policy") / "constraints.txt"
    policy.write_text("torch<0\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(envs.HOME_ENV, CACHE_HOME)
        patch.setenv("OPE_CONSTRAINTS", str(policy))
        env = _cached_env()
        if env is None:
            _skip_unless_buildable()
            if os.path.isdir(os.path.join(CACHE_HOME, "envs", ENV_NAME)):
                envs.remove(ENV_NAME)
            env = envs.create(ENV_NAME, python=HOST_MINOR, requires=TF_REQUIRES,
                              log=lambda line: print(f"[{ENV_NAME}] {line}"))
        yield env


@pytest.fixture
def in_tf_home(tf_env, monkeypatch):
    """OPE_HOME holding the cached environments, "tf" among them."""
    monkeypatch.setenv(envs.HOME_ENV, CACHE_HOME)
    return tf_env


@pytest.fixture(scope="module")
def saved(tf_env, tmp_path_factory):
    """A SavedModel made by the environment's TensorFlow, test inputs and TensorFlow's own
    outputs for them."""
    work = tmp_path_factory.mktemp("saved-model")
    rng = np.random.default_rng(3)
    inputs = {"x": rng.standard_normal((5, 4)).astype(np.float32),
              "ids": np.arange(5, dtype=np.int64)}
    np.savez(work / "inputs.npz", **inputs)
    (work / "make.py").write_text(_MAKE_SAVED_MODEL)
    subprocess.run([tf_env.python, str(work / "make.py"), str(work / "model"),
                    str(work / "inputs.npz"), str(work / "outputs.npz")], check=True,
                   capture_output=True, timeout=300)
    with np.load(work / "outputs.npz") as npz:
        expected = {name: npz[name] for name in npz.files}
    return str(work / "model"), inputs, expected


@pytest.fixture(scope="module")
def package(saved, tf_env, package_root):
    folder, inputs, expected = saved
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(envs.HOME_ENV, CACHE_HOME)
        return ope.package_tensorflow(os.path.join(package_root, "tf-scorer"), folder,
                                      name="tf-scorer", requires={"tensorflow-cpu": "==2.21.*"},
                                      test_inputs=inputs, test_outputs=expected)


def test_tensorflow_is_not_on_this_host():
    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401


def test_specs_come_from_the_signature(package):
    assert [(s.name, s.dtype, s.shape) for s in package.inputs] == [
        ("ids", "int64", (None,)), ("x", "float32", (None, 4))]
    assert [(s.name, s.dtype, s.shape) for s in package.outputs] == [
        ("next_ids", "int64", (None,)), ("scores", "float32", (None, 3))]
    assert package.requires == {"tensorflow-cpu": "==2.21.*"}, "a provider of tensorflow"
    assert package.config["signature"] == "serving_default"


def test_results_equal_tensorflow_in_its_environment(in_tf_home, package, saved):
    _, inputs, expected = saved
    with ope.load(package.path) as model:
        worker = model.stats()["worker"]
        outputs = model.infer(inputs)
        assert model.infer({"x": inputs["x"][:2], "ids": inputs["ids"][:2]})["scores"].shape \
            == (2, 3)
    np.testing.assert_allclose(outputs["scores"], expected["scores"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(outputs["next_ids"], expected["next_ids"])
    assert worker["executable"] == in_tf_home.python
    assert (worker["framework"], worker["framework_version"]) == (
        "tensorflow", in_tf_home.packages["tensorflow-cpu"])


def test_bad_inputs_and_model_errors(in_tf_home, package, saved):
    _, inputs, _ = saved
    with ope.load(package.path) as model:
        with pytest.raises(SpecError, match="'x'"):
            model.infer({"x": inputs["x"].astype(np.float64), "ids": inputs["ids"]})
        with pytest.raises(ModelError, match="ids must be >= 0"):
            model.infer({"x": inputs["x"], "ids": -inputs["ids"] - 1})
        assert model.infer(inputs)["next_ids"].tolist() == [1, 2, 3, 4, 5]


def test_without_the_environment_and_building_off_the_error_names_tensorflow(
        package, tmp_path, monkeypatch):
    monkeypatch.setenv(envs.HOME_ENV, str(tmp_path / "empty-home"))
    with pytest.raises(EnvError, match=r"tensorflow-cpu==2\.21\.\*: not installed[\s\S]*"
                                       r"ope env create --from"):
        ope.load(package.path, build=False)


def test_a_fresh_home_builds_tensorflow_from_the_package_lock(package, saved, tmp_path,
                                                             monkeypatch, capfd):
    """A host with no TensorFlow environment at all: the first load builds it from the lock
    the package carries (tensorflow-cpu, pinned with hashes), showing its progress."""
    _, inputs, expected = saved
    monkeypatch.setenv(envs.HOME_ENV, str(tmp_path / "fresh-home"))
    assert "tensorflow-cpu==2.21." in package.lock_text()
    with ope.load(package.path) as model:
        np.testing.assert_allclose(model.infer(inputs)["scores"], expected["scores"], rtol=1e-5)
    assert ": ready" in capfd.readouterr().err


def test_given_specs_and_another_signature(saved, package_root):
    folder, _, _ = saved
    with pytest.raises(PackageError, match="no signature 'predict'.*serving_default"):
        ope.package_tensorflow(os.path.join(package_root, "tf-predict"), folder,
                               name="tf-predict", signature="predict")
    given = ope.package_tensorflow(
        os.path.join(package_root, "tf-given"), folder, name="tf-given",
        inputs=[TensorSpec("x", "float32", ("n", 4)), TensorSpec("ids", "int64", ("n",))],
        outputs=[TensorSpec("scores", "float32", ("n", 3)),
                 TensorSpec("next_ids", "int64", ("n",))])
    assert given.inputs[0].shape == ("n", 4)


def test_wrong_format_is_refused_naming_the_path(saved, package_root, tmp_path):
    folder, _, _ = saved
    with pytest.raises(PackageError, match=f"{folder}.*SavedModel.*package_tensorflow"):
        ope.package_keras(os.path.join(package_root, "keras-from-tf"), folder,
                          name="keras-from-tf", backend="torch",
                          outputs=[TensorSpec("y", "float32", (None,))])
    (tmp_path / "not-saved").mkdir()
    with pytest.raises(PackageError, match="not-saved"):
        ope.package_tensorflow(os.path.join(package_root, "tf-empty"), tmp_path / "not-saved",
                               name="tf-empty")


def _cached_env():
    """The "tf" environment if it is up to date, else None."""
    try:
        env = envs.get(ENV_NAME)
    except EnvError:
        return None
    fresh = (env.ope_version == ope.__version__ and env.stale is False
             and env.requires == TF_REQUIRES and env.python_version.startswith(HOST_MINOR))
    return env if fresh else None


def _skip_unless_buildable():
    """Skip (fail in CI) with the reason when the registry cannot be reached."""
    index = load_policy().index_url or "https://pypi.org/simple/"
    try:
        urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=10).close()
    except OSError as exc:
        reason = f"cannot build the TensorFlow environment: registry {index} unreachable ({exc})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
