"""Fault injection with real processes and real signals: every fault the supervisor claims to
handle surfaces as its typed error, the host and other models go on, and nothing leaks.

The bounds asserted here carry slack for a loaded CI machine; bench/bench_faults.py measures
the real detection latencies.
"""

import collections
import faulthandler
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import numpy as np
import psutil
import pytest

import models
import ope
from ope import TensorSpec
from ope.host.worker_process import LIVENESS_SLICE_S
from faults import SLOW_RELOAD_ENV, fault_inputs, fault_package

SLACK_S = 1.0


@pytest.fixture(scope="session")
def faulty(package_root):
    return fault_package(str(package_root))


@pytest.fixture
def open_model(faulty):
    models = []

    def open_(path=faulty, **options):
        options.setdefault("timeout_s", 10.0)
        options.setdefault("stop_grace_s", 0.5)
        model = ope.load(path, out_of_process=True, **options)
        models.append(model)
        return model

    yield open_
    for model in models:
        model.close()


def assert_works(model):
    out = model.infer(fault_inputs("ok", x=(1.0, 2.0)))
    np.testing.assert_array_equal(out["y"], [2.0, 3.0])


@pytest.mark.parametrize("fault, how", [("segfault", "SIGSEGV"), ("exit3", "exited with code 3"),
                                        ("sigkill", "SIGKILL")])
def test_a_crash_raises_worker_crashed_and_the_next_call_gets_a_fresh_worker(open_model, fault, how):
    model = open_model()
    first_pid = model.stats()["pid"]
    start = time.monotonic()
    with pytest.raises(ope.WorkerCrashed) as caught:
        model.infer(fault_inputs(fault))
    assert time.monotonic() - start < 0.1 + SLACK_S
    assert how in str(caught.value)
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie"
    assert_works(model)
    assert model.stats()["pid"] != first_pid


def test_worker_crashed_carries_exit_code_and_the_last_output_lines(open_model):
    model = open_model()
    with pytest.raises(ope.WorkerCrashed) as caught:
        model.infer(fault_inputs("exit3"))
    assert caught.value.exitcode == 3
    assert "fault: exiting with code 3" in caught.value.stderr_tail
    assert "fault: exiting with code 3" in str(caught.value)


def test_a_segfault_leaves_the_native_stack_in_the_error(open_model):
    model = open_model()
    with pytest.raises(ope.WorkerCrashed) as caught:
        model.infer(fault_inputs("segfault"))
    assert "Segmentation fault" in caught.value.stderr_tail


def test_worker_output_goes_to_the_worker_logger(open_model, caplog):
    model = open_model()
    with caplog.at_level("INFO", logger="ope.worker.faults"):
        with pytest.raises(ope.WorkerCrashed):
            model.infer(fault_inputs("exit3"))
    assert any(r.name == "ope.worker.faults" and "exiting with code 3" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("fault", ["spin", "sleep"])
def test_a_call_past_its_deadline_raises_worker_timeout(open_model, fault):
    model = open_model(timeout_s=0.3)
    pid = model.stats()["pid"]
    start = time.monotonic()
    with pytest.raises(ope.WorkerTimeout):
        model.infer(fault_inputs(fault, x=(30.0,)))
    assert time.monotonic() - start < 0.3 + 0.5 + SLACK_S  # deadline + SIGTERM grace
    assert not psutil.pid_exists(pid)
    assert_works(model)


def test_a_per_call_timeout_overrides_the_models(open_model):
    model = open_model(timeout_s=None)
    with pytest.raises(ope.WorkerTimeout):
        model.infer(fault_inputs("sleep", x=(30.0,)), timeout_s=0.2)
    assert_works(model)


def test_a_worker_that_ignores_sigterm_is_killed(open_model):
    model = open_model(timeout_s=0.2, stop_grace_s=0.3)
    with pytest.raises(ope.WorkerTimeout):
        model.infer(fault_inputs("ignore_sigterm_spin"))
    assert_works(model)


def test_crossing_the_memory_limit_kills_the_worker_and_raises(open_model):
    model = open_model(memory_limit_mb=150)
    pid = model.stats()["pid"]
    with pytest.raises(ope.MemoryLimitExceeded) as caught:
        model.infer(fault_inputs("balloon"))
    assert "memory_limit_mb=150" in str(caught.value)
    assert_works(model)
    assert model.stats()["pid"] != pid
    assert "memory limit" in model.health()["failures"][-1]["reason"]


def _helpers_of(model):
    """The processes the model's worker started (its children: none has left it yet)."""
    return psutil.Process(model.stats()["pid"]).children()


def _end_worker(model, end):
    """End the model's worker the way ``end`` says; returns seconds to the error."""
    start = time.monotonic()
    if end == "close":
        model.close()
    elif end == "crash":
        with pytest.raises(ope.WorkerCrashed) as caught:
            model.infer(fault_inputs("exit3"))
        assert "fault: exiting with code 3" in caught.value.stderr_tail
    elif end == "timeout":
        with pytest.raises(ope.WorkerTimeout):
            model.infer(fault_inputs("spin"), timeout_s=0.3)
    elif end == "memory":
        with pytest.raises(ope.MemoryLimitExceeded):
            model.infer(fault_inputs("balloon"))
    return time.monotonic() - start


@pytest.mark.parametrize("helper", ["spawn", "escape", "fork"])
@pytest.mark.parametrize("end", ["close", "crash", "timeout", "memory"])
def test_processes_a_model_starts_die_with_its_worker(open_model, helper, end):
    """A helper holds the worker's output pipe open and, for "escape", sits outside its
    process group: the error still comes in time, and the helper dies with the worker."""
    model = open_model(memory_limit_mb=150 if end == "memory" else None)
    assert_works(model)
    model.infer(fault_inputs(helper))
    helpers = _helpers_of(model)
    assert len(helpers) == 1
    time.sleep(0.3)  # the supervisor's periodic look at the worker's descendants
    elapsed = _end_worker(model, end)
    assert _wait_gone(helpers[0].pid, SLACK_S)
    if end == "crash":
        assert elapsed < 0.1 + SLACK_S
    elif end == "timeout":
        assert elapsed < 0.3 + LIVENESS_SLICE_S + SLACK_S
    if end != "close":
        assert_works(model)


def test_processes_started_at_load_die_with_the_worker(open_model, package_root):
    model = open_model(fault_package(str(package_root), name="load_spawn", load="spawn"))
    helpers = _helpers_of(model)
    assert len(helpers) == 1
    model.close()
    assert _wait_gone(helpers[0].pid, SLACK_S)


def test_a_restart_leaves_no_helper_thread_or_descriptor_behind(open_model):
    """Each worker's helper held its output pipe: the host must not keep a thread or a
    descriptor waiting for that pipe's end."""
    model = open_model(max_restarts=100)
    assert_works(model)
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        model.infer(fault_inputs("spawn"))
        with pytest.raises(ope.WorkerCrashed):
            model.infer(fault_inputs("sigkill"))
        assert_works(model)
    assert threading.active_count() <= threads
    assert len(os.listdir("/proc/self/fd")) <= fds


def _anonymous_rss():
    """Bytes of this process's anonymous resident memory: its heap, not shared mappings."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("when", ["load", "call"])
def test_output_without_newlines_keeps_the_host_small(open_model, package_root, caplog, when):
    path = fault_package(str(package_root), name="load_flood", load="flood") \
        if when == "load" else fault_package(str(package_root))
    name = os.path.basename(path)
    before = _anonymous_rss()
    with caplog.at_level("INFO", logger=f"ope.worker.{name}"):
        model = open_model(path)
        if when == "call":
            model.infer(fault_inputs("flood"))
        deadline = time.monotonic() + 10.0
        while not any("flood done" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the output after the flood never came"
            time.sleep(0.01)  # polling the reader thread's progress
    assert _anonymous_rss() - before < 16 << 20
    cut = [r.getMessage() for r in caplog.records if "cut: line longer" in r.getMessage()]
    assert len(cut) == 1 and len(cut[0]) < 65 << 10
    assert_works(model)


@pytest.mark.parametrize("fault", ["shared_balloon", "memfd_balloon"])
def test_shared_memory_of_the_models_own_counts_against_the_limit(open_model, fault):
    """384 MiB in a MAP_SHARED anonymous mapping or a memfd: shared memory, but not the
    arena's, so it is the worker's own."""
    model = open_model(memory_limit_mb=150)
    with pytest.raises(ope.MemoryLimitExceeded, match="memory_limit_mb=150"):
        model.infer(fault_inputs(fault))
    assert_works(model)


def test_the_arena_does_not_count_against_the_limit(open_model, package_root):
    """200 MiB in and 200 MiB out through the arena, under a 150 MiB limit."""
    path = models.echo_package(str(package_root), [TensorSpec("x", "uint8", ("n",))],
                               name="big_echo").path
    model = open_model(path, memory_limit_mb=150)
    pid = model.stats()["pid"]
    x = model.empty("x", (200 << 20,))
    x[::4096] = 7
    out = model.infer({"x": x})["echo_x"]
    time.sleep(0.5)  # several of the supervisor's checks, with both mapped in the worker
    assert out[4096] == 7 and model.stats()["pid"] == pid
    assert model.health()["private_rss_bytes"] < 150 << 20
    assert model.infer({"x": x})["echo_x"][8192] == 7
    assert model.stats()["pid"] == pid and model.health()["restarts"] == 0


@pytest.mark.parametrize("how", ["infer", "submit"])
@pytest.mark.parametrize("fault", ["garbage", "garbage_everywhere", "garbage_host_queue"])
def test_garbage_in_shared_memory_is_a_protocol_error_not_a_host_crash(open_model, fault, how):
    """Whatever bytes a worker writes into the arena: a ProtocolError for the call that meets
    them (garbage in the queue the host writes into is met by the host's next send), a fresh
    worker with a fresh control segment for the calls after it, and a clean close."""
    model = open_model()
    held = model.infer(fault_inputs(x=[5.0] * 1000))["y"]  # an output of the old worker
    pid = model.stats()["pid"]
    failed = 0
    for inputs in (fault_inputs(fault), fault_inputs("ok")):
        try:
            model.infer(inputs) if how == "infer" else model.submit(inputs).result()
        except ope.ProtocolError:
            failed += 1
    assert failed == 1
    for _ in range(3):
        assert_works(model)
    assert model.stats()["pid"] != pid
    assert held.shape == (1000,)  # still mapped: reading it cannot fault
    model.close()


def test_a_worker_cannot_shrink_a_segment_under_the_host(open_model):
    """Truncating a segment under another process's mapping would SIGBUS it: every segment
    is sealed against it, the host's own reached through /proc included."""
    model = open_model()
    pid = model.stats()["pid"]
    assert model.infer(fault_inputs("shrink"))["y"].tolist() == [2.0, 3.0]
    assert model.stats()["pid"] == pid and model.health()["restarts"] == 0


def test_a_model_exception_keeps_the_same_worker(open_model):
    model = open_model()
    pid = model.stats()["pid"]
    with pytest.raises(ope.ModelError, match="the model says no"):
        model.infer(fault_inputs("raise"))
    assert_works(model)
    assert model.stats()["pid"] == pid


def test_a_crash_on_the_nth_call_restarts_and_serving_goes_on(open_model, package_root):
    model = open_model(fault_package(str(package_root), name="crash3", crash_on_call=3))
    for cycle in range(3):  # each fresh worker counts its calls from one again
        assert_works(model)
        assert_works(model)
        with pytest.raises(ope.WorkerCrashed, match="code 9"):
            assert_works(model)
    assert model.health()["restarts"] == 3


@pytest.mark.parametrize("load, error, text", [
    ("crash", ope.WorkerCrashed, "exited with code 7"),
    ("raise", ope.ModelError, "weights are corrupt"),
])
def test_a_load_failure_in_the_worker_raises_with_its_cause(package_root, load, error, text):
    path = fault_package(str(package_root), name=f"load_{load}", load=load)
    with pytest.raises(error) as caught:
        ope.load(path, out_of_process=True)
    assert text in str(caught.value)


def test_a_model_that_hangs_while_loading_times_out(package_root):
    path = fault_package(str(package_root), name="load_hang", load="hang")
    with pytest.raises(ope.WorkerTimeout, match="did not finish .* in time"):
        ope.load(path, out_of_process=True, load_timeout_s=3.0, stop_grace_s=0.2)


def test_too_many_failures_break_the_model_and_calls_fail_at_once(open_model):
    model = open_model(max_restarts=2, restart_window_s=60.0)
    for _ in range(3):
        with pytest.raises(ope.WorkerCrashed):
            model.infer(fault_inputs("exit3"))
    start = time.monotonic()
    with pytest.raises(ope.ModelBroken) as caught:
        model.infer(fault_inputs("ok"))
    assert time.monotonic() - start < SLACK_S
    assert str(caught.value).count("crashed: exited with code 3") == 3
    assert model.health()["state"] == "broken"


def test_an_eager_restart_replaces_the_worker_without_a_call(open_model):
    model = open_model(restart="eager")
    pid = model.stats()["pid"]
    with pytest.raises(ope.WorkerCrashed):
        model.infer(fault_inputs("sigkill"))
    deadline = time.monotonic() + 30
    while model.health()["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.02)  # polling a state another thread changes; not synchronising work
    health = model.health()
    assert health["state"] == "ready" and health["pid"] not in (None, pid)
    assert_works(model)


def test_one_models_crash_does_not_touch_another(open_model):
    victim, bystander = open_model(), open_model()
    pid = bystander.stats()["pid"]
    with pytest.raises(ope.WorkerCrashed):
        victim.infer(fault_inputs("segfault"))
    assert_works(bystander)
    assert bystander.stats()["pid"] == pid and bystander.health()["restarts"] == 0


def test_outputs_stay_readable_after_the_worker_crashes(open_model):
    model = open_model()
    kept = model.infer(fault_inputs("ok", x=np.arange(1000)))["y"]
    with pytest.raises(ope.WorkerCrashed):
        model.infer(fault_inputs("sigkill"))
    np.testing.assert_array_equal(kept, np.arange(1000) + 1)


def test_close_from_another_thread_interrupts_a_call_in_flight(open_model):
    model = open_model()
    raised = []
    started = threading.Event()

    def call():
        started.set()
        try:
            model.infer(fault_inputs("sleep", x=(30.0,)))
        except ope.OpeError as exc:
            raised.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    started.wait()
    model.close()
    thread.join(10)
    assert not thread.is_alive()
    assert raised and isinstance(raised[0], ope.ModelClosed)
    model.close()  # idempotent


def test_health_reports_state_pid_memory_and_cpu(open_model):
    model = open_model()
    health = model.health()
    assert health["state"] == "ready" and health["pid"] == model.stats()["pid"]
    assert health["rss_bytes"] > 0 and health["cpu_user_s"] >= 0
    model.close()
    assert model.health()["state"] == "closed"


def test_health_is_busy_while_a_call_runs_and_ready_once_it_ended(open_model):
    model = open_model()
    call = threading.Thread(target=lambda: model.infer(fault_inputs("sleep", x=(0.5, 0.0))))
    call.start()
    deadline = time.monotonic() + 5.0
    while model.health()["state"] != "busy" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert model.health()["state"] == "busy"
    call.join()
    assert model.health()["state"] == "ready"
    with pytest.raises(ope.ModelError):
        model.infer(fault_inputs("raise"))
    assert model.health()["state"] == "ready"
    model.infer(fault_inputs("ok"))
    assert model.health()["state"] == "ready"


def _two_versions(root):
    """Two builds of a package named "swapped" (y = x + 1, then y = x + 2): the deployed one
    and the next, as (path, path)."""
    source = "def factory(d):\n    return lambda x: {{'y': x + {}}}\n"
    return tuple(models.numpy_package(str(root / folder), source.format(add), name="swapped",
                                      inputs=[ope.TensorSpec("x", "int64", ())],
                                      outputs=[ope.TensorSpec("y", "int64", ())]).path
                 for folder, add in (("deployed", 1), ("upcoming", 2)))


def _deploy(path, replacement):
    """Replace the package folder at ``path``, as a deployment does: by renames."""
    os.rename(path, path + ".previous")
    os.rename(replacement, path)


def _answer(model):
    return int(model.infer({"x": np.array(10)})["y"])


def test_a_restart_refuses_a_package_replaced_on_disk_since_it_was_loaded(open_model, tmp_path):
    path, upcoming = _two_versions(tmp_path)
    model = open_model(path)
    assert _answer(model) == 11
    _deploy(path, upcoming)
    assert _answer(model) == 11  # the running worker goes on with what it loaded
    os.kill(model.health()["pid"], signal.SIGKILL)
    with pytest.raises(ope.WorkerCrashed):
        _answer(model)
    with pytest.raises(ope.PackageError, match=f"package at {path} changed on disk since it "
                                               f"was loaded \\(manifest digest: expected "):
        _answer(model)  # the restart reads the new folder, and refuses it
    assert "changed on disk" in model.health()["failures"][-1]["reason"]
    with pytest.raises((ope.PackageError, ope.ModelBroken)):
        _answer(model)


def test_a_restart_refuses_a_link_added_to_the_package_since_it_was_loaded(open_model, tmp_path):
    path = _two_versions(tmp_path)[0]
    model = open_model(path)
    # A linked folder code/model/ would be imported before code/model.py; the manifest,
    # and so its digest, do not change.
    outside = tmp_path / "outside" / "model"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("def factory(d):\n    return lambda x: {'y': x * 0}\n")
    os.symlink(outside, os.path.join(path, "code", "model"))
    os.kill(model.health()["pid"], signal.SIGKILL)
    with pytest.raises(ope.WorkerCrashed):
        _answer(model)
    with pytest.raises(ope.PackageError, match="code/model is a symbolic link"):
        _answer(model)


def test_replicas_never_serve_a_package_replaced_on_disk(open_model, tmp_path):
    path, upcoming = _two_versions(tmp_path)
    model = open_model(path, replicas=2)
    assert {_answer(model) for _ in range(4)} == {11}
    _deploy(path, upcoming)

    def answers(calls):
        seen = []
        for _ in range(calls):
            try:
                seen.append(_answer(model))
            except ope.OpeError as exc:
                seen.append(type(exc))
        return seen

    def refused_restart():
        failures = model.health()["replicas"][0]["failures"]
        return any("changed on disk" in failure["reason"] for failure in failures)

    first, second = (replica["pid"] for replica in model.health()["replicas"])
    os.kill(first, signal.SIGKILL)
    seen = answers(20)
    assert 11 in seen and 12 not in seen  # the other replica serves; the killed one never
    deadline = time.monotonic() + 30
    while not refused_restart() and time.monotonic() < deadline:  # restarts run eagerly
        time.sleep(0.02)  # polling a state another thread changes; not synchronising work
    assert refused_restart()
    os.kill(second, signal.SIGKILL)
    seen += answers(10)
    assert 12 not in seen and ope.PackageError in seen


_HOST_SCRIPT = textwrap.dedent('''
    import logging, sys
    import numpy as np
    import ope
    sys.path.insert(0, {tests!r})
    from faults import fault_inputs
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    model = ope.load({path!r}, out_of_process=True)
    print("worker", model.stats()["pid"], flush=True)
    if {mid_call!r}:
        model.infer(fault_inputs("sleep", x=(60.0,)))
''')


def _run_host(faulty, mid_call):
    script = _HOST_SCRIPT.format(tests=os.path.dirname(__file__), path=faulty, mid_call=mid_call)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def _wait_gone(pid, timeout_s):
    """Whether ``pid`` exits within the time. An orphan stays a zombie until this machine's
    init reaps it; a zombie runs nothing, so it counts as gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.005)  # polling another process's state; nothing to synchronise with
    return False


def _segments_of(pid):
    """Names of ``pid``'s in /dev/shm: there should never be any, its segments are memfds."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"ope-{pid}-")]


def _mapped_segments(pid):
    with open(f"/proc/{pid}/maps") as maps:
        return sum("memfd:ope-arena" in line for line in maps)


def test_a_host_killed_mid_call_takes_its_worker_and_segments_with_it(faulty):
    host = _run_host(faulty, mid_call=True)
    worker_pid = int(host.stdout.readline().split()[1])
    for line in host.stdout:  # the worker's own output, relayed by the host's logger
        if "fault: sleeping" in line:
            break
    assert _mapped_segments(host.pid) and _mapped_segments(worker_pid)
    assert _segments_of(host.pid) == []
    host.kill()
    host.wait()
    start = time.monotonic()
    assert _wait_gone(worker_pid, 1.0 + SLACK_S)  # the last holder of the segments
    assert time.monotonic() - start < 1.0 + SLACK_S
    assert _segments_of(host.pid) == []
    host.stdout.close()


_EXEC_HOST_SCRIPT = textwrap.dedent('''
    import ctypes, os, sys, time
    import ope
    model = ope.load({path!r}, out_of_process=True)
    print("worker", model.stats()["pid"], flush=True)
    if {how!r} != "exec":
        # A child that outlives what the host does next; a raw fork skips Python's at-fork
        # handlers, so that child keeps the host's end of the watchdog pipe.
        child = ctypes.CDLL(None).fork() if {how!r} == "raw_fork_then_die" else os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
        print("child", child, flush=True)
    if {how!r} == "raw_fork_then_die":
        os.kill(os.getpid(), 9)
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)"])
''')


@pytest.mark.parametrize("how", ["exec", "fork_then_exec", "raw_fork_then_die"])
def test_a_host_that_execs_or_dies_takes_its_worker_and_segments_with_it(faulty, how):
    """exec keeps the host's pid, so only the end of file on the host's pipe tells the worker
    that its host is gone; a forked child of the host must not hold that pipe open; a child
    that does (forked behind Python's back) leaves the host's death to the pidfd."""
    script = _EXEC_HOST_SCRIPT.format(path=faulty, how=how)
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        worker_pid = int(host.stdout.readline().split()[1])
        if how != "exec":
            child = int(host.stdout.readline().split()[1])
        start = time.monotonic()
        assert _wait_gone(worker_pid, 1.0 + SLACK_S)
        assert time.monotonic() - start < 1.0 + SLACK_S
        assert (host.poll() is None) == (how != "raw_fork_then_die")
        assert _segments_of(host.pid) == []
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        host.kill()
        host.wait()
        host.stdout.close()


def test_interpreter_exit_with_a_model_open_leaves_nothing_behind(faulty):
    host = _run_host(faulty, mid_call=False)
    worker_pid = int(host.stdout.readline().split()[1])
    assert host.wait(60) == 0
    assert _wait_gone(worker_pid, SLACK_S)
    assert _segments_of(host.pid) == []
    host.stdout.close()


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


# -- a forked host ----------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [None, 2])
def test_a_forked_child_cannot_use_or_stop_its_parents_model(faulty, replicas):
    """A model belongs to the process that loaded it: in a forked child (no exec) a call is
    ModelClosed saying so, and closing, collecting or exiting only drops the child's copies.
    The parent's workers, arena and calls go on untouched."""
    import gc

    from forked import run_in_child

    model = ope.load(faulty, out_of_process=True, replicas=replicas)
    try:
        assert model.infer(fault_inputs(x=[1.0]))["y"].tolist() == [2.0]
        pids = _worker_pids(model)

        def child():
            outcomes = []
            for call in (lambda: model.infer(fault_inputs(x=[1.0])),
                         lambda: model.submit(fault_inputs(x=[1.0])),
                         lambda: model.empty("x", (4,))):
                try:
                    call()
                    outcomes.append("served")
                except ope.ModelClosed as exc:
                    outcomes.append(str(exc))
            model.close()
            ope.host.out_of_process._close_open_models()  # what interpreter exit runs
            return outcomes

        kind, *result = run_in_child(child)
        assert kind == "returned", result
        assert all("is a fork of it" in text for text in result[0]), result
        for _ in range(3):  # the parent's copy, and whatever the child dropped, collected
            gc.collect()
            assert model.infer(fault_inputs(x=[3.0]))["y"].tolist() == [4.0]
        assert _worker_pids(model) == pids  # neither stopped nor restarted
    finally:
        model.close()


def _worker_pids(model):
    health = model.health()
    return sorted(r["pid"] for r in health["replicas"]) if "replicas" in health else [health["pid"]]


def test_other_users_names_in_dev_shm_cannot_stop_a_load_or_a_growing_arena(faulty):
    """Another user who watches /dev/shm and makes the names ope would make next, or leaves a
    stale segment there, stops nothing: ope's segments have no names."""
    squatted = ["/dev/shm/ope-1-deadbeef-0"]

    def squat(name):
        with open(name, "wb") as f:
            f.write(b"\0" * 64)
        os.chown(name, 65534, 65534)  # another user's, owner-only
        os.chmod(name, 0o600)
        squatted.append(name)

    squat(squatted.pop())
    ours = f"ope-{os.getpid()}-"
    try:
        with ope.load(faulty, out_of_process=True, arena_mb=1) as model:
            prefixes = {name.rsplit("-", 1)[0] for name in os.listdir("/dev/shm")
                        if name.startswith(ours)}
            for prefix in prefixes:  # what a squatter sees of an arena with names
                for seg_id in range(1, 9):
                    squat(f"/dev/shm/{prefix}-{seg_id}")
            big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB each way: both sides grow
            np.testing.assert_array_equal(model.infer(fault_inputs(x=big))["y"], big + 1)
            assert not prefixes
    finally:
        for name in squatted:
            os.unlink(name)


# -- supervision: one model's trouble never delays another's -------------------------------

def _wait_for(predicate, timeout_s, poll_s=0.005):
    """Whether ``predicate()`` came true within the time (polling state other threads change)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


@pytest.mark.parametrize("restart", ["lazy", "eager"])
def test_a_worker_that_dies_while_idle_is_seen_within_the_crash_bound(open_model, restart):
    model = open_model(restart=restart)
    pid = model.health()["pid"]
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    assert _wait_for(lambda: model.health()["failures"], 0.1 + SLACK_S), model.health()
    assert time.monotonic() - start < 0.1 + SLACK_S
    failure = model.health()["failures"][-1]["reason"]
    assert "idle" in failure and "SIGKILL" in failure
    if restart == "lazy":
        assert model.health()["state"] == "restarting" and model.health()["pid"] is None
    else:
        assert _wait_for(lambda: model.health()["state"] == "ready", 30), model.health()
        assert model.health()["pid"] not in (None, pid)
    assert_works(model)
    assert model.health()["pid"] not in (None, pid) and model.health()["restarts"] == 1


def test_a_slow_restart_does_not_delay_another_models_memory_limit(open_model, tmp_path):
    slow = open_model(restart="eager", env_vars={SLOW_RELOAD_ENV: str(tmp_path / "loaded")})
    bounded = open_model(memory_limit_mb=100)
    with pytest.raises(ope.WorkerCrashed):
        slow.infer(fault_inputs("sigkill"))
    assert _wait_for(lambda: slow.health()["state"] == "starting", 5.0), slow.health()
    start = time.monotonic()
    with pytest.raises(ope.MemoryLimitExceeded) as caught:
        bounded.infer(fault_inputs("balloon_to", x=(800.0,)))  # would reach 800 MiB in ~2 s
    took = time.monotonic() - start
    rss_mib = float(re.search(r"memory limit exceeded: (\d+) MiB", str(caught.value)).group(1))
    assert rss_mib < 300, f"killed at {rss_mib} MiB, {took:.2f} s after the call started"
    assert took < 0.5 + SLACK_S
    assert slow.health()["state"] == "starting", "the slow restart ended first: nothing shown"
    assert_works(bounded)


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
    assert _wait_for(lambda: _ope_threads() <= threads_before, 2.0), \
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
