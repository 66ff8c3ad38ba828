"""Outputs born in the arena: out of process, numpy arrays of 64 KiB or more that a model makes
while it runs come from the worker's ring, and an output the model let go of travels by
reference, not copied (ope/bridge/arena.py, ope_native's memory hook). Whatever the model
keeps, and whatever the caller holds, must keep its values through later calls, a worker's
crash and close(); both modes answer alike.
"""

import os
import signal
import time

import numpy as np
import pytest

import ope
from ope import TensorSpec

import models

N = 1 << 16  # float32: 256 KiB per output, above the hook's threshold

_SOURCE = '''
import threading

import numpy as np


def factory(data_dir):
    kept, cache = [], {}

    def model(x, mode):
        mode = str(mode)
        if mode == "add":
            return {"y": x + 1}
        if mode == "keep":  # the model keeps its own output
            y = x + 1
            kept.append(y)
            return {"y": y}
        if mode == "kept_sum":  # what the model kept, read back
            return {"y": np.full(x.shape, sum(float(k[0]) for k in kept), np.float32)}
        if mode == "cache":  # an array made in one call, kept and returned in the next ones
            if "c" not in cache:
                cache["c"] = np.zeros_like(x)
            cache["c"] += x
            return {"y": cache["c"]}
        if mode == "keep_dict":  # the model keeps the dict it returns
            cache["d"] = {"y": x + 1}
            return cache["d"]
        if mode == "bump_dict":  # and writes into its arrays later
            cache["d"]["y"] += 100
            return {"y": np.zeros_like(x)}
        if mode == "view":  # a view of a bigger array the model made
            return {"y": (np.concatenate([x, x]) + 1)[x.size:]}
        if mode == "resize":  # numpy reallocates the model's array in place
            y = np.zeros(x.size // 2, np.float32)
            y.resize(x.size, refcheck=False)
            y[:] = x + 1
            return {"y": y}
        if mode == "thread":  # allocated by another thread during the call
            box = []
            worker = threading.Thread(target=lambda: box.append(x + 1))
            worker.start()
            worker.join()
            return {"y": box[0]}
        raise ValueError(mode)

    return model
'''


@pytest.fixture(scope="module")
def maker(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("arena_outputs"))
    return models.numpy_package(root, _SOURCE, name="maker",
                                inputs=[TensorSpec("x", "float32", ("n",)),
                                        TensorSpec("mode", "string", ())],
                                outputs=[TensorSpec("y", "float32", ("n",))]).path


def call(model, x, mode="add"):
    return model.infer({"x": x, "mode": np.array(mode)})["y"]


def copied_out(model, mode):
    return model.stats()["bytes_copied_out"] if mode == "out_of_process" else 0


def test_large_outputs_equal_the_models_survive_later_calls_and_are_not_copied(load_model, mode, maker):
    model = load_model(maker)
    call(model, np.zeros(N, np.float32))  # the first output is copied: the arena grows for it
    before = copied_out(model, mode)
    for i in range(5):
        assert (call(model, np.full(N, i, np.float32)) == i + 1).all()
    assert copied_out(model, mode) == before
    held = [call(model, np.full(N, i, np.float32)) for i in range(16)]
    for i, y in enumerate(held):
        assert y.shape == (N,) and (y == i + 1).all()
    # The arena grows by at least what it holds for each copy: held outputs make few copies.
    assert copied_out(model, mode) - before <= 5 * N * 4


@pytest.mark.parametrize("behaviour", ["view", "resize", "thread"])
def test_views_reallocations_and_other_threads_give_the_models_values(load_model, maker, behaviour):
    model = load_model(maker)
    for i in range(3):
        x = np.arange(N, dtype=np.float32) * i
        assert (call(model, x, behaviour) == x + 1).all()


def test_small_outputs_are_copied_and_equal_the_models(load_model, mode, maker):
    model = load_model(maker)
    held = [call(model, np.full(4, i, np.float32)) for i in range(3)]
    assert [y.tolist() for y in held] == [[i + 1] * 4 for i in range(3)]
    if mode == "out_of_process":
        assert model.stats()["bytes_copied_out"] == 3 * 16


def test_a_model_keeping_its_outputs_keeps_their_values(load_model, maker):
    model = load_model(maker)
    held = [call(model, np.full(N, i, np.float32), "keep") for i in range(6)]
    for _ in range(4):  # the ring is reused meanwhile
        call(model, np.full(N, 100, np.float32))
    assert all((y == i + 1).all() for i, y in enumerate(held))
    assert (call(model, np.zeros(N, np.float32), "kept_sum") == sum(range(1, 7))).all()


def test_a_model_keeping_the_dict_it_returns_cannot_change_what_the_caller_holds(load_model, mode,
                                                                                 maker):
    model = load_model(maker)
    held = call(model, np.full(N, 1, np.float32), "keep_dict")
    call(model, np.zeros(N, np.float32), "bump_dict")
    # In process the caller holds the model's own array (as a direct call would).
    assert (held == (102 if mode == "in_process" else 2)).all()


def test_a_cache_returned_call_after_call_gives_each_call_its_own_values(load_model, mode, maker):
    model = load_model(maker)
    held = [call(model, np.full(N, 1, np.float32), "cache") for _ in range(4)]
    # In process the model returns its cache itself; out of process each call's output
    # is that call's value (the kept array is copied, not handed over).
    if mode == "out_of_process":
        assert [float(y[0]) for y in held] == [1, 2, 3, 4]
    assert (held[-1] == 4).all()


def test_held_outputs_survive_a_worker_crash_and_close(open_arena_model, maker):
    model = open_arena_model(maker)
    before = call(model, np.full(N, 5, np.float32))
    os.kill(model.stats()["pid"], signal.SIGKILL)
    with pytest.raises(ope.WorkerCrashed):
        for _ in range(100):  # until the host sees the death
            call(model, np.full(N, 1, np.float32))
            time.sleep(0.05)
    assert (before == 6).all()
    after = call(model, np.full(N, 7, np.float32))
    assert (after == 8).all()
    model.close()
    assert (before == 6).all() and (after == 8).all()


def test_the_arena_returns_to_its_reservation_after_a_burst(open_arena_model, maker):
    model = open_arena_model(maker)
    reserved = model.stats()["arena_bytes_reserved"]
    small = call(model, np.full(N, 1, np.float32))
    burst = [call(model, np.full(4 << 20, i, np.float32)) for i in range(6)]
    during = model.stats()
    assert during["arena_bytes_worker"] >= 6 * (16 << 20)
    held = burst[3]
    del burst
    shrunk = _wait_for(model, lambda s: s["arena_bytes_worker"] < 2 * held.nbytes + (8 << 20))
    assert shrunk["arena_bytes_worker"] >= held.nbytes  # the held output's segment stays
    assert (held == 4).all() and (small == 2).all()
    del held
    after = _wait_for(model, lambda s: s["arena_bytes_worker"] <= 8 << 20)
    assert after["arena_bytes_reserved"] == reserved and (small == 2).all()
    assert (call(model, np.full(4 << 20, 9, np.float32)) == 10).all()


def test_inputs_copied_in_a_burst_are_given_back_too(open_arena_model, maker):
    model = open_arena_model(maker)
    reserved = model.stats()["arena_bytes_reserved"]
    for i in range(3):
        call(model, np.full(4 << 20, i, np.float32))
    assert model.stats()["arena_bytes_reserved"] > reserved
    _wait_for(model, lambda s: s["arena_bytes_reserved"] == reserved)


def test_without_the_memory_hook_outputs_are_copied(open_arena_model, maker):
    """What a worker whose numpy has no handler API (< 1.22) does: copy each output once."""
    model = open_arena_model(maker, env_vars={"OPE_ARENA_OUTPUTS": "0"})
    held = [call(model, np.full(N, i, np.float32)) for i in range(3)]
    assert all((y == i + 1).all() for i, y in enumerate(held))
    assert model.stats()["bytes_copied_out"] == 3 * N * 4


@pytest.fixture
def open_arena_model():
    opened = []

    def open_(path, **options):
        opened.append(ope.load(path, out_of_process=True, **options))
        return opened[-1]

    yield open_
    for model in opened:
        model.close()


def _wait_for(model, condition, timeout_s=15.0):
    """``model``'s stats once ``condition`` holds of them; the arena shrinks on idle sweeps
    (after about 1.5 s)."""
    end = time.monotonic() + timeout_s
    while not condition(model.stats()):
        assert time.monotonic() < end, f"the arena did not shrink: {model.stats()}"
        time.sleep(0.1)
    return model.stats()


_OUT_SOURCE = '''
import numpy as np


def factory(data_dir):
    def model(x, out=None):
        if out is None:  # called without ``out``: an output shape the inputs do not fix
            return {"y": x + 1, "seen": np.array(0, np.int64)}
        np.add(x, 1, out=out["y"])
        out["seen"][...] = 1
    return model
'''


@pytest.mark.parametrize("y_shape,given_out", [(("n",), 1), ((None,), 0)])
def test_a_model_taking_out_writes_into_arrays_it_is_given(load_model, mode, tmp_path, y_shape,
                                                           given_out):
    path = models.numpy_package(str(tmp_path), _OUT_SOURCE, name="writer",
                                inputs=[TensorSpec("x", "float32", ("n",))],
                                outputs=[TensorSpec("y", "float32", y_shape),
                                         TensorSpec("seen", "int64", ())]).path
    model = load_model(path)
    model.infer({"x": np.zeros(N, np.float32)})  # the first output is copied: the arena grows
    before = copied_out(model, mode)
    for i in range(4):
        outputs = model.infer({"x": np.full(N, i, np.float32)})
        assert (outputs["y"] == i + 1).all() and outputs["seen"] == given_out
        del outputs  # its block is free for the next call
    if mode == "out_of_process":
        assert copied_out(model, mode) - before == 4 * 8  # only the small "seen"
