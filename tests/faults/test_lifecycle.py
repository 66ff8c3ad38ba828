"""Processes end with their owners: a model's helper processes die with its worker, and a
worker with its host, whether the host is killed, execs, exits or forks."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

import ope
from ope.host.worker_process import LIVENESS_SLICE_S
from fault_package import SLACK_S, assert_works, fault_inputs, fault_package

# The folder of the tests' helper modules, for the host scripts run here to import them.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


_HOST_SCRIPT = textwrap.dedent('''
    import logging, sys
    import numpy as np
    import ope
    sys.path.insert(0, {tests!r})
    from fault_package import fault_inputs
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    model = ope.load({path!r}, out_of_process=True)
    print("worker", model.stats()["pid"], flush=True)
    if {mid_call!r}:
        model.infer(fault_inputs("sleep", x=(60.0,)))
''')


def _run_host(faulty, mid_call):
    script = _HOST_SCRIPT.format(tests=TESTS, path=faulty, mid_call=mid_call)
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


_FORKING_HOST_SCRIPT = textwrap.dedent('''
    import gc, os, sys
    import ope
    sys.path.insert(0, {tests!r})
    from fault_package import fault_inputs
    model = ope.load({path!r}, out_of_process=True)
    pid = model.stats()["pid"]
    child = os.fork()
    if child == 0:  # uses its copy, drops it, and exits the normal way: atexit, finalisers
        try:
            model.infer(fault_inputs(x=[1.0]))
        except ope.ModelClosed:
            pass
        del model
        gc.collect()
        sys.exit(0)
    os.waitpid(child, 0)
    print(model.infer(fault_inputs(x=[3.0]))["y"].tolist(), model.stats()["pid"] == pid,
          flush=True)
    model.close()
''')


def test_a_forked_child_that_exits_normally_leaves_its_parents_model_alone(faulty):
    script = _FORKING_HOST_SCRIPT.format(tests=TESTS, path=faulty)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[4.0] True", done.stdout + done.stderr


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
