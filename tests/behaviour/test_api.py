"""The Model handle through the public API: lifecycle, stats, empty/seal, mode selection."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import ope
import ope_native
from ope import ModelClosed, OpeError, PackageError, SpecError, TensorSpec

import models


def affine_inputs(batch=2):
    return {"x": np.ones((batch, 4), np.float32)}


def test_public_names_exist():
    for name in ope.__all__:
        assert hasattr(ope, name), name
    assert ope.__version__ == "0.1.0"
    assert issubclass(ope.RequirementError, ope.PackageError)
    assert issubclass(ope.SpecError, ope.OpeError)


def test_context_manager_closes(mode, affine):
    with ope.load(affine.path, out_of_process=(mode == "out_of_process")) as model:
        assert model.infer(affine_inputs())["y"].shape == (2, 3)
    with pytest.raises(ModelClosed, match="'affine' is closed"):
        model.infer(affine_inputs())
    assert model.health()["open"] is False


def test_close_twice_is_fine(load_model, affine):
    model = load_model(affine.path)
    model.close()
    model.close()


def test_stats_count_calls_errors_and_latency(load_model, affine):
    model = load_model(affine.path)
    assert model.stats()["latency_p50_us"] is None
    for _ in range(5):
        model.infer(affine_inputs())
    with pytest.raises(SpecError):
        model.infer({"x": np.ones((2, 5), np.float32)})
    stats = model.stats()
    assert stats["calls"] == 6 and stats["errors"] == 1
    assert 0 < stats["latency_p50_us"] <= stats["latency_p90_us"] <= stats["latency_p99_us"]
    assert {"bytes_copied_in", "bytes_copied_out", "pid"} <= set(stats)


def test_call_stats_count_bytes_and_keep_the_latencies_of_the_last_calls_only():
    stats = ope_native.CallStats(3)
    began = time.monotonic_ns()
    time.sleep(0.01)
    stats.record(began, False)  # ~10 ms: pushed out of the window by the later calls
    stats.record(time.monotonic_ns(), True)
    for _ in range(3):
        stats.record(time.monotonic_ns(), False)
    stats.copied(16, 8)
    stats.copied(0, 8)
    calls, errors, copied_in, copied_out, latencies = stats.snapshot()
    assert (calls, errors, copied_in, copied_out, len(latencies)) == (5, 1, 16, 16, 3)
    assert max(latencies) < 10_000_000
    with pytest.raises(ValueError, match="window must be >= 1"):
        ope_native.CallStats(0)


def test_in_process_stats_and_health(affine):
    with ope.load(affine.path, out_of_process=False) as model:
        assert model.stats()["pid"] == os.getpid()
        assert model.stats()["bytes_copied_out"] == 0
        assert model.health() == {"name": "affine", "open": True, "mode": "in_process"}


def test_empty_and_seal(load_model, affine):
    model = load_model(affine.path)
    x = model.empty("x", (3, 4))
    assert x.dtype == np.float32 and x.shape == (3, 4) and x.flags.writeable
    x[:] = 1
    sealed = model.seal(x)
    assert not sealed.flags.writeable
    with pytest.raises(ValueError):
        sealed[0, 0] = 2
    np.testing.assert_allclose(model.infer({"x": sealed})["y"],
                               model.infer(affine_inputs(3))["y"])


@pytest.mark.parametrize("name, shape, message", [
    ("x", (3, 5), "input 'x': dim 1 expected size 4, got 5"),
    ("x", (3,), "input 'x': expected rank 2"),
    ("x", (-1, 4), "shape must be a tuple of ints"),
    ("y", (3, 4), "unknown input 'y'"),
])
def test_empty_checks_the_spec(load_model, affine, name, shape, message):
    model = load_model(affine.path)
    with pytest.raises(SpecError, match=message):
        model.empty(name, shape)
    assert model.empty("x", (0, 4)).shape == (0, 4)


def test_load_missing_package(load_model, tmp_path):
    with pytest.raises(PackageError, match="no model package at"):
        load_model(str(tmp_path / "nothing"))


def test_environment_variable_selects_the_mode(monkeypatch, affine):
    monkeypatch.setenv("OPE_OUT_OF_PROCESS", "0")
    with ope.load(affine.path) as model:
        assert model.health()["mode"] == "in_process"
    monkeypatch.setenv("OPE_OUT_OF_PROCESS", "yes")
    with pytest.raises(OpeError, match="OPE_OUT_OF_PROCESS must be 0 or 1"):
        ope.load(affine.path)


def test_worker_options_are_refused_in_process(affine):
    with pytest.raises(TypeError, match="apply only out of process"):
        ope.load(affine.path, out_of_process=False, memory_limit_mb=100)


def test_model_is_usable_from_several_threads(load_model, affine):
    model = load_model(affine.path)
    expected = model.infer(affine_inputs(4))["y"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: model.infer(affine_inputs(4))["y"], range(40)))
    for result in results:
        np.testing.assert_array_equal(result, expected)
    assert model.stats()["calls"] == 41


_WRITES_ITS_INPUT = '''
def factory(data_dir):
    def scribble(x):
        x[0] = -1.0
        return {"y": x}
    return scribble
'''


def test_a_model_cannot_write_into_its_inputs_in_either_mode(tmp_path, load_model):
    spec = [TensorSpec("x", "float32", (3,))]
    model = load_model(models.numpy_package(str(tmp_path), _WRITES_ITS_INPUT, name="scribble",
                                            inputs=spec, outputs=[TensorSpec("y", "float32", (3,))]).path)
    x = np.ones(3, np.float32)
    with pytest.raises(ope.ModelError, match="read-only"):
        model.infer({"x": x})
    np.testing.assert_array_equal(x, 1)
    assert x.flags.writeable
