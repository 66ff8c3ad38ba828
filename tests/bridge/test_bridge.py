"""The shared-memory bridge seen through the public API: zero copy, output lifetime, arena
growth and limits, sealing, accounting, and the mode switch."""

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ope
from ope import TensorSpec

import models

_ADD_ONE = '''
def factory(data_dir):
    def add_one(x):
        return {"y": x + 1}
    return add_one
'''


@pytest.fixture(scope="module")
def add_one(tmp_path_factory):
    return models.numpy_package(
        str(tmp_path_factory.mktemp("add_one")), _ADD_ONE, name="add_one",
        inputs=[TensorSpec("x", "float32", ("n",))],
        outputs=[TensorSpec("y", "float32", ("n",))]).path


@pytest.fixture
def model(add_one):
    with ope.load(add_one, out_of_process=True, arena_mb=1, arena_max_mb=64) as loaded:
        yield loaded


def test_arena_inputs_are_not_copied_and_ordinary_ones_are_copied_once(model):
    x = model.empty("x", (1000,))
    x[...] = 3
    view = x.reshape(10, 100)[2:5].reshape(-1)  # a contiguous view of an arena array
    np.testing.assert_array_equal(model.infer({"x": x})["y"], 4)
    np.testing.assert_array_equal(model.infer({"x": view})["y"], 4)
    assert model.stats()["bytes_copied_in"] == 0
    model.infer({"x": np.ones(1000, np.float32)})
    model.infer({"x": torch.ones(1000)})
    assert model.stats()["bytes_copied_in"] == 2 * 4000
    assert model.stats()["bytes_copied_out"] == 3 * 4000 + view.nbytes


def test_outputs_are_views_on_shared_memory_that_outlive_close(add_one):
    model = ope.load(add_one, out_of_process=True)
    out = model.infer({"x": np.arange(5, dtype=np.float32)})["y"]
    assert not out.flags.owndata
    model.close()
    np.testing.assert_array_equal(out, [1, 2, 3, 4, 5])
    out[0] = 42  # the caller owns it: writable, and nothing else sees the write
    assert out[0] == 42


def test_dropped_outputs_and_buffers_give_their_space_back(model):
    x = np.ones(100_000, np.float32)
    model.infer({"x": x})
    baseline = model.stats()["arena_bytes_in_use"]
    kept = [model.infer({"x": x})["y"] for _ in range(5)]
    assert model.stats()["arena_bytes_in_use"] >= baseline + 5 * x.nbytes
    buffer = model.empty("x", (100_000,))
    del kept, buffer
    gc.collect()
    assert model.stats()["arena_bytes_in_use"] == baseline


def test_held_outputs_do_not_stop_later_calls(model):
    x = np.ones(50_000, np.float32)
    held = [model.infer({"x": x * i})["y"] for i in range(40)]  # more than the 1 MiB ring
    for i, out in enumerate(held):
        assert out[0] == i + 1


def test_the_arena_grows_for_a_large_tensor(model):
    before = model.stats()["arena_bytes_reserved"]
    x = np.ones(4 << 20, np.float32)  # 16 MiB, far over the 1 MiB ring
    np.testing.assert_array_equal(model.infer({"x": x})["y"][:3], 2)
    assert model.stats()["arena_bytes_reserved"] > before


def test_past_the_arena_limit_a_call_fails_cleanly_and_the_model_stays_usable(model):
    with pytest.raises(ope.ArenaFull, match="arena_max_mb"):
        model.infer({"x": np.ones(32 << 20, np.float32)})  # 128 MiB > 64 MiB limit
    with pytest.raises(ope.ArenaFull):
        model.empty("x", (32 << 20,))
    np.testing.assert_array_equal(model.infer({"x": np.ones(3, np.float32)})["y"], 2)


_BLOW_UP = '''
import numpy as np

def factory(data_dir):
    def blow_up(n):
        return {"y": np.ones(int(n), np.float32)}
    return blow_up
'''


def test_an_output_over_the_workers_arena_limit_is_an_arena_full_error(tmp_path):
    path = models.numpy_package(str(tmp_path), _BLOW_UP, name="blow_up",
                                inputs=[TensorSpec("n", "int64", ())],
                                outputs=[TensorSpec("y", "float32", ("m",))]).path
    with ope.load(path, out_of_process=True, arena_mb=1, arena_max_mb=8) as model:
        with pytest.raises(ope.ArenaFull):
            model.infer({"n": np.array(3 << 20)})  # a 12 MiB output
        assert model.infer({"n": np.array(3)})["y"].tolist() == [1, 1, 1]


def test_seal_makes_an_arena_array_read_only_for_good(model):
    x = model.seal(model.empty("x", (4,)))
    with pytest.raises(ValueError):
        x[0] = 1
    with pytest.raises(ValueError):
        x.flags.writeable = True
    np.testing.assert_array_equal(model.infer({"x": x})["y"].shape, (4,))


_HOLD = '''
import time

def factory(data_dir):
    def hold(x, seconds):
        time.sleep(float(seconds))
        return {"y": x + 1}
    return hold
'''


def test_an_arena_input_is_read_only_while_its_call_is_in_flight(tmp_path):
    path = models.numpy_package(str(tmp_path), _HOLD, name="hold",
                                inputs=[TensorSpec("x", "float32", ("n",)),
                                        TensorSpec("seconds", "float64", ())],
                                outputs=[TensorSpec("y", "float32", ("n",))]).path
    with ope.load(path, out_of_process=True) as model:
        x = model.empty("x", (4,))
        x[...] = 1
        future = model.submit({"x": x, "seconds": np.array(2.0)})
        assert not future.done()  # the worker holds the call for 2 s
        assert not x.flags.writeable
        with pytest.raises(ValueError):
            x[0] = 5
        np.testing.assert_array_equal(future.result()["y"], 2)
        assert x.flags.writeable
        x[...] = 2  # reused for the next tick
        np.testing.assert_array_equal(model.infer({"x": x, "seconds": np.array(0.0)})["y"], 3)


def test_stats_report_the_bridge(model):
    model.infer({"x": np.ones(4, np.float32)})
    stats = model.stats()
    for key in ("calls", "errors", "bytes_copied_in", "bytes_copied_out", "arena_bytes_in_use",
                "arena_high_water", "pid", "latency_p50_us", "latency_p99_us"):
        assert key in stats, key
    assert stats["pid"] != os.getpid() and stats["arena_high_water"] >= stats["arena_bytes_in_use"]


def test_empty_checks_name_and_shape(model):
    with pytest.raises(ope.SpecError, match="unknown input 'z'"):
        model.empty("z", (4,))
    with pytest.raises(ope.SpecError):
        model.empty("x", (2, 2))


@pytest.mark.parametrize("setting, expected", [("0", True), ("1", False)])
def test_the_environment_variable_switches_the_default_mode(add_one, setting, expected):
    script = (f"import ope, os; m = ope.load({add_one!r}); "
              f"print(m.stats()['pid'] == os.getpid()); m.close()")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "OPE_OUT_OF_PROCESS": setting}, check=True)
    assert out.stdout.strip() == str(expected)


def test_the_worker_imports_the_hosts_ope_whatever_the_current_folder_holds(add_one, tmp_path,
                                                                          monkeypatch):
    for name in ("ope", "workers"):  # e.g. an old checkout where the job happens to run
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the wrong copy')\n")
    monkeypatch.chdir(tmp_path)
    with ope.load(add_one, out_of_process=True) as model:
        np.testing.assert_array_equal(model.infer({"x": np.zeros(2, np.float32)})["y"], 1)
