"""Random faults under load: every call gets its own answer or a typed error, also with many
threads calling while workers are SIGKILLed."""

import collections
import faulthandler
import itertools
import os
import random
import signal
import sys
import threading
import time
import traceback

import numpy as np
import psutil
import pytest

import ope
from fault_package import assert_works, fault_inputs, wait_for


def _stress(model, calls, seed):
    rng = random.Random(seed)
    faults = ["ok"] * 12 + ["segfault", "exit3", "sigkill", "raise", "garbage"]
    expected_errors = (ope.WorkerCrashed, ope.ModelError, ope.ProtocolError)
    outcomes = {"ok": 0, "error": 0}
    for i in range(calls):
        fault = rng.choice(faults)
        x = np.full(rng.randint(1, 5000), float(i), np.float32)
        try:
            out = model.infer(fault_inputs(fault, x=x))
        except expected_errors:
            assert fault != "ok"
            outcomes["error"] += 1
        else:
            assert fault in ("ok",), f"call {i} with fault {fault} returned"
            np.testing.assert_array_equal(out["y"], x + 1)
            outcomes["ok"] += 1
    return outcomes


def test_calls_with_random_faults_are_each_correct_or_a_typed_error(open_model):
    model = open_model(max_restarts=10_000)
    outcomes = _stress(model, 300, seed=1)
    assert outcomes["ok"] > 150 and outcomes["error"] > 10


@pytest.mark.slow
def test_soak_thousands_of_calls_with_random_faults(open_model):
    model = open_model(max_restarts=100_000)
    outcomes = _stress(model, 2000, seed=2)
    assert outcomes["ok"] + outcomes["error"] == 2000


# -- many threads, random SIGKILLs: every call gets its own answer or a typed error ---------

_HANG_S = 60.0  # no iteration of the workload waits longer; past it, a thread is stuck
_WAIT_S = 15.0  # each wait of the workload on one call


@pytest.fixture
def watchdog():
    """A hang that survives the test's own watchdog (e.g. in close at teardown) dumps every
    thread's stack and ends the run instead of hanging it."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _ope_threads():
    return {t for t in threading.enumerate()
            if t.name.startswith("ope-") and t.name != "ope-supervisor"}


def _all_stacks():
    frames = sys._current_frames()
    return "\n".join(f"--- {thread.name}\n" + "".join(traceback.format_stack(frames[thread.ident]))
                     for thread in threading.enumerate() if thread.ident in frames)


def _kill_a_worker(model, rng):
    """SIGKILL one of ``model``'s workers that is serving (one still loading is spared: killing
    every start would only show the restart policy's backoff)."""
    health = model.health()
    pids = [h["pid"] for h in health.get("replicas", [health])
            if h["pid"] is not None and h["state"] in ("ready", "busy")]
    if not pids:
        return
    try:
        worker = psutil.Process(rng.choice(pids))
        if worker.ppid() == os.getpid():
            worker.send_signal(signal.SIGKILL)  # psutil checks the pid was not reused
    except psutil.NoSuchProcess:
        pass


def _calls_while_workers_die(model, seconds, seed, threads=4):
    """``threads`` threads call ``model`` for ``seconds`` (infer; bursts of submit collected
    in random order; done-callbacks that call again, or wait with a timeout for another call)
    while another thread SIGKILLs its workers at random. Every call's x is distinct, so each
    answer (y = x + 1) shows whose it is. Fails with every thread's stack if a thread hangs.
    Returns the count of answers and of typed errors."""
    ids = itertools.count(1)
    counted = threading.Lock()
    outcomes = collections.Counter()
    wrong = []  # anything but the call's own answer or an OpeError
    stop = threading.Event()

    def new_call():
        x = np.array([next(ids)], np.float32)
        return x, fault_inputs("ok", x=x)

    def count(outcome):
        with counted:
            outcomes[outcome] += 1

    def expect(x, get):
        """Check the answer of the call with ``x`` that ``get()`` returns (or raises)."""
        try:
            out = get()
        except ope.OpeError:
            count("error")
        except BaseException:
            wrong.append(f"call x={x[0]}: {traceback.format_exc()}")
        else:
            if np.array_equal(out["y"], x + 1):
                count("ok")
            else:
                wrong.append(f"call x={x[0]} got y={out['y']}")

    def submit(x, call):
        """The call's future, or None if submit itself refused it (counted like expect)."""
        try:
            return model.submit(call)
        except ope.OpeError:
            count("error")
        except BaseException:
            wrong.append(f"submit x={x[0]}: {traceback.format_exc()}")
        return None

    def call_again():
        x, call = new_call()
        expect(x, lambda: model.infer(call))

    def with_callback(rng):
        x, call = new_call()
        future = submit(x, call)
        if future is None:
            return
        ran = threading.Event()
        later = None
        if rng.random() < 0.5:  # the callback waits, with a timeout, for a later call
            x2, call2 = new_call()
            later = submit(x2, call2)

        def callback(done):
            expect(x, done.result)
            if later is not None:
                expect(x2, lambda: later.result(timeout=_WAIT_S))
            else:  # the callback calls the model again
                call_again()
            ran.set()

        future.add_done_callback(callback)
        if rng.random() < 0.5:
            expect(x, lambda: future.result(timeout=_WAIT_S))
        if not ran.wait(_WAIT_S):
            wrong.append(f"the done-callback of call x={x[0]} did not run")

    def caller(index):
        rng = random.Random(seed * 1000 + index)
        while not stop.is_set():
            way = rng.random()
            if way < 0.25:
                call_again()
            elif way < 0.75:
                burst = []
                for _ in range(rng.randint(1, 4)):
                    x, call = new_call()
                    future = submit(x, call)
                    if future is not None:
                        burst.append((x, future))
                rng.shuffle(burst)
                for x, future in burst:
                    expect(x, future.result)
            else:
                with_callback(rng)

    def killer():
        rng = random.Random(seed)
        while not stop.wait(rng.uniform(0.02, 0.25)):
            _kill_a_worker(model, rng)

    workers = [threading.Thread(target=caller, args=(i,), name=f"caller-{i}", daemon=True)
               for i in range(threads)]
    workers.append(threading.Thread(target=killer, name="killer", daemon=True))
    for thread in workers:
        thread.start()
    time.sleep(seconds)
    stop.set()
    deadline = time.monotonic() + _HANG_S
    for thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in workers if thread.is_alive()]
    if stuck:
        pytest.fail(f"threads {stuck} hung; all stacks:\n{_all_stacks()}", pytrace=False)
    assert not wrong, "\n".join(wrong[:5])
    return outcomes


def _stress_while_killing(faulty, seconds, seed, replicas, restart):
    threads_before = _ope_threads()
    options = dict(out_of_process=True, stop_grace_s=0.5, timeout_s=30.0, restart=restart,
                   max_restarts=10**6)
    if replicas > 1:
        options["replicas"] = replicas
    model = ope.load(faulty, **options)
    try:
        outcomes = _calls_while_workers_die(model, seconds, seed)
        assert outcomes["ok"] > 20 and outcomes["error"] > 0, outcomes
        assert_works(model)
    finally:
        model.close()
    assert wait_for(lambda: _ope_threads() <= threads_before, 2.0), \
        f"threads left after close: {_ope_threads() - threads_before}"


@pytest.mark.parametrize("replicas, restart", [(2, "eager"), (1, "lazy")])
def test_threads_calling_while_workers_are_killed_get_answers_or_typed_errors(
        watchdog, faulty, replicas, restart):
    _stress_while_killing(faulty, 2.5, seed=replicas, replicas=replicas, restart=restart)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_soak_threads_calling_while_workers_are_killed(watchdog, faulty, seed):
    replicas, restart = [(2, "eager"), (1, "lazy"), (3, "eager"), (1, "eager")][seed % 4]
    _stress_while_killing(faulty, 5.0, seed=100 + seed, replicas=replicas, restart=restart)
