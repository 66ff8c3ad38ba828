"""Async calls: futures, ordering on one worker, parallelism across workers, asyncio, threads.

Parallelism is shown by behaviour, not speed: each call reports when it ran (wall clock read
inside the worker) and the tests check that calls to different models overlapped.
"""

import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

import ope
from ope import TensorSpec

import models
from fault_package import fault_inputs, fault_package

_TIMED_SOURCE = '''
import time
import numpy as np

def factory(data_dir):
    def run(x, hold):
        started = time.time()
        time.sleep(float(hold))
        return {"y": x + 1, "span": np.array([started, time.time()])}
    return run
'''


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    return models.numpy_package(
        str(tmp_path_factory.mktemp("timed")), _TIMED_SOURCE, name="timed",
        inputs=[TensorSpec("x", "float32", ("n",)), TensorSpec("hold", "float64", ())],
        outputs=[TensorSpec("y", "float32", ("n",)), TensorSpec("span", "float64", (2,))]).path


def call_inputs(i, hold=0.0):
    return {"x": np.full(3, i, np.float32), "hold": np.array(hold)}


def test_submit_returns_a_future_of_the_same_outputs_as_infer(load_model, timed):
    model = load_model(timed)
    future = model.submit(call_inputs(5))
    assert isinstance(future, concurrent.futures.Future)
    np.testing.assert_array_equal(future.result()["y"], model.infer(call_inputs(5))["y"])


def test_calls_to_one_model_complete_in_submission_order(load_model, timed):
    model = load_model(timed)
    futures = [model.submit(call_inputs(i, hold=0.01)) for i in range(8)]
    results = [f.result() for f in reversed(futures)]  # collected out of order
    assert [r["y"][0] for r in reversed(results)] == [i + 1 for i in range(8)]
    starts = [r["span"][0] for r in reversed(results)]
    assert starts == sorted(starts)


def test_a_second_submit_does_not_wait_for_the_first_call(timed):
    with ope.load(timed, out_of_process=True) as model:
        first = model.submit(call_inputs(1, hold=2.0))
        first_started = model.submit(call_inputs(0))  # queued behind it, in order
        assert not first.done(), "submit waited for the call in flight"
        assert first.result()["y"][0] == 2 and first_started.result()["y"][0] == 1


def test_submit_checks_inputs_at_once(load_model, timed):
    model = load_model(timed)
    with pytest.raises(ope.SpecError, match="'x'"):
        model.submit({"x": np.zeros(3, np.float64), "hold": np.array(0.0)})
    assert model.submit(call_inputs(1)).result()["y"][0] == 2


def test_futures_work_with_concurrent_futures_wait(load_model, timed):
    model = load_model(timed)
    futures = [model.submit(call_inputs(i)) for i in range(4)]
    done, not_done = concurrent.futures.wait(futures, timeout=60)
    assert not not_done and len(done) == 4


def test_futures_work_with_as_completed_callbacks_and_timed_results(load_model, timed):
    """Each way to wait without calling result() gets the call completed (out of process, the
    collector thread does it)."""
    model = load_model(timed)
    futures = [model.submit(call_inputs(i)) for i in range(3)]
    assert sorted(f.result()["y"][0] for f in concurrent.futures.as_completed(futures, 60)) == [1, 2, 3]
    called = threading.Event()
    model.submit(call_inputs(0, hold=0.05)).add_done_callback(lambda done: called.set())
    assert called.wait(60)
    assert model.submit(call_inputs(7, hold=0.05)).result(timeout=60)["y"][0] == 8
    assert model.submit(call_inputs(0, hold=0.05)).exception(timeout=60) is None


def test_result_collects_in_the_callers_thread_and_a_call_cannot_be_cancelled(timed):
    with ope.load(timed, out_of_process=True) as model:
        futures = [model.submit(call_inputs(i, hold=0.05)) for i in range(3)]
        assert not futures[2].cancel(), "a call that runs in the worker cannot be cancelled"
        assert [f.result()["y"][0] for f in futures] == [1, 2, 3]
        collectors = [t for t in threading.enumerate() if t.name == f"ope-collector-{model.name}"]
        assert not collectors, "a thread was woken to collect replies nobody needed it for"
        assert model.stats()["calls"] == 3


def test_polling_done_and_fire_and_forget_calls_complete(load_model, timed):
    model = load_model(timed)
    future = model.submit(call_inputs(1, hold=0.05))
    deadline = time.monotonic() + 60
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert future.done() and future.result()["y"][0] == 2
    # Far more calls than the reply queue holds, none ever asked for: none may block.
    futures = [model.submit(call_inputs(i)) for i in range(3000)]
    assert [f.result(timeout=60)["y"][0] for f in futures[-3:]] == [2998, 2999, 3000]
    assert model.stats()["calls"] == 3001


def test_a_done_callback_may_wait_for_the_next_call(load_model, timed):
    model = load_model(timed)
    first, second = model.submit(call_inputs(1)), model.submit(call_inputs(2, hold=0.05))
    seen = []
    first.add_done_callback(lambda done: seen.append(second.result()["y"][0]))
    assert first.result(timeout=60)["y"][0] == 2
    assert second.result(timeout=60)["y"][0] == 3 and seen == [3]


def test_a_done_callback_gets_another_calls_result_with_a_timeout_as_soon_as_it_is_there(
        load_model, timed):
    model = load_model(timed)
    first, second = model.submit(call_inputs(1)), model.submit(call_inputs(2, hold=0.05))
    seen = []

    def callback(done):
        start = time.monotonic()
        seen.append((second.result(timeout=5)["y"][0], time.monotonic() - start))

    first.add_done_callback(callback)
    assert first.result(timeout=60)["y"][0] == 2
    assert second.result(timeout=60)["y"][0] == 3
    assert len(seen) == 1, "the callback's wait raised"
    value, waited = seen[0]
    assert value == 3 and waited < 1.0, f"the callback waited {waited:.2f} s"


_BAD_TIMEOUTS = [("1", TypeError), (True, TypeError), ([1.0], TypeError), (1j, TypeError),
                 (-1, ValueError), (-0.5, ValueError), (float("nan"), ValueError),
                 (np.float32("nan"), ValueError)]


@pytest.mark.parametrize("how", ["infer", "submit"])
def test_a_bad_timeout_is_refused_before_anything_is_sent(load_model, timed, how):
    model = load_model(timed)
    call = getattr(model, how)
    buffer = model.empty("x", (3,))
    buffer[...] = 4.0
    in_use = model.stats().get("arena_bytes_in_use")
    for bad, error in _BAD_TIMEOUTS:
        with pytest.raises(error, match="timeout_s"):
            call({"x": buffer, "hold": np.array(0.0)}, timeout_s=bad)
        assert buffer.flags.writeable, f"timeout_s={bad!r} left the arena buffer sealed"
    assert model.stats().get("arena_bytes_in_use") == in_use, "input copies leaked"
    for good in (None, 30, 30.0, np.float64(30.0), float("inf")):
        out = model.infer({"x": buffer, "hold": np.array(0.0)}, timeout_s=good)
        assert out["y"][0] == 5.0
        assert model.submit(call_inputs(good is None), timeout_s=good).result()["y"][0] == \
            (good is None) + 1
    assert buffer.flags.writeable
    assert model.health().get("restarts", 0) == 0
    assert model.stats()["calls"] == 10 + len(_BAD_TIMEOUTS)


def test_infer_async_under_asyncio(load_model, timed):
    model = load_model(timed)

    async def main():
        return await asyncio.gather(*(model.infer_async(call_inputs(i)) for i in range(4)))

    assert [r["y"][0] for r in asyncio.run(main())] == [1, 2, 3, 4]


def test_calls_to_different_models_run_in_parallel(timed):
    with ope.load(timed, out_of_process=True) as a, ope.load(timed, out_of_process=True) as b:
        first, second = a.submit(call_inputs(1, hold=0.5)), b.submit(call_inputs(2, hold=0.5))
        span_a, span_b = first.result()["span"], second.result()["span"]
    assert span_a[0] < span_b[1] and span_b[0] < span_a[1], "the two calls did not overlap"


def test_threads_sharing_one_model_each_get_their_own_results(load_model, timed):
    model = load_model(timed)
    errors, barrier = [], threading.Barrier(4)

    def hammer(worker_index):
        barrier.wait()
        for i in range(50):
            value = worker_index * 1000 + i
            try:
                out = model.infer(call_inputs(value))
                assert out["y"][0] == value + 1
            except Exception as exc:  # collected and reported by the main thread
                errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    assert model.stats()["calls"] == 200


def test_a_crash_fails_the_call_and_those_queued_behind_it_then_serving_goes_on(package_root):
    with ope.load(fault_package(str(package_root)), out_of_process=True) as model:
        ok = model.submit(fault_inputs("ok"))
        crash = model.submit(fault_inputs("exit3"))
        behind = [model.submit(fault_inputs("ok")) for _ in range(3)]
        assert ok.result()["y"][0] == 2
        with pytest.raises(ope.WorkerCrashed, match="code 3"):
            crash.result()
        for future in behind:
            with pytest.raises(ope.WorkerCrashed, match="lost"):
                future.result()
        assert model.submit(fault_inputs("ok")).result()["y"][0] == 2


def test_closing_fails_calls_still_pending(package_root):
    model = ope.load(fault_package(str(package_root)), out_of_process=True)
    slow = model.submit(fault_inputs("sleep", x=(30.0,)))
    queued = model.submit(fault_inputs("ok"))
    model.close()
    for future in (slow, queued):
        with pytest.raises(ope.ModelClosed):
            future.result(timeout=30)
