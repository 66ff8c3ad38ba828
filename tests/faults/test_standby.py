"""Standby workers (``ope.load(path, standby=N)``): after a fault of the serving worker a
standby that was started and loaded before it takes over, with calls in flight at the fault
still failing; a standby's own death is mended without touching the serving worker; nothing
is left behind on close. Takeover is checked by who answers (a pid that existed before the
crash), not by timing: bench/bench_recovery.py measures it."""

import os
import signal
import threading

import numpy as np
import psutil
import pytest

import ope
from fault_package import SLACK_S, assert_works, fault_inputs, wait_for

READY_S = 30.0 + SLACK_S  # a standby's start and load on a loaded CI machine


def _standbys(model, count=1):
    """The pids of ``model``'s ready standbys, once ``count`` of them are ready."""
    assert wait_for(lambda: model.health()["standby"]["ready"] >= count, READY_S), \
        model.health()["standby"]
    return model.health()["standby"]["pids"]


def _holder(model, x):
    """The model (the replica, with replicas) whose arena holds ``x``: calls passing it go
    there."""
    return next((r for r in model.replicas if r.holds(x)), None) \
        if hasattr(model, "replicas") else model


def _call(model, x, fault, *values):
    """Run ``fault`` with ``x``, an arena array (model.empty), holding ``values`` first: after
    a takeover the new worker must map the host's segment under it."""
    x[:len(values)] = values
    return model.infer({"fault": fault_inputs(fault)["fault"], "x": x})


FAULTS = [("sigkill", ope.WorkerCrashed, {}),
          ("sleep", ope.WorkerTimeout, {"timeout_s": 1.0}),
          ("balloon", ope.MemoryLimitExceeded, {"memory_limit_mb": 150})]


@pytest.mark.parametrize("replicas", [None, 2])
@pytest.mark.parametrize("fault,error,options", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_standby_takes_over_after_a_fault(open_model, replicas, fault, error, options):
    model = open_model(standby=1, replicas=replicas, **options)
    x = model.empty("x", (2,))
    serving = _holder(model, x)
    standby = _standbys(serving)[0]
    crashed = serving.stats()["pid"]
    with pytest.raises(error):
        _call(model, x, fault, 30.0)
    # The standby was installed with the fault: the model is ready at once, no start.
    assert serving.state == "ready"
    assert serving.stats()["pid"] == standby != crashed
    np.testing.assert_array_equal(_call(model, x, "ok", 1.0, 2.0)["y"], [2.0, 3.0])
    assert serving.stats()["pid"] == standby
    assert not psutil.pid_exists(crashed)
    assert serving.health()["restarts"] == 1
    # The pool refills in the background with a new standby.
    assert wait_for(lambda: serving.health()["standby"]["pids"] not in ([], [standby]),
                    READY_S)
    assert serving.health()["standby"]["failures"] == []
    assert_works(model)


def test_a_sigkill_from_outside_is_taken_over(open_model):
    model = open_model(standby=1)
    standby = _standbys(model)[0]
    crashed = model.stats()["pid"]
    os.kill(crashed, signal.SIGKILL)
    # Whether the supervisor or the next call sees the death first, no call waits for a
    # start: the worker that answers is the standby, started before the kill.
    answered = None
    for _ in range(3):
        try:
            assert_works(model)
            answered = model.stats()["pid"]
            break
        except ope.WorkerCrashed:  # the call was sent to the dead worker: never retried
            pass
    assert answered == standby
    assert model.health()["restarts"] == 1


def test_arena_arrays_made_after_the_standby_started_reach_it(open_model):
    """An array from model.empty too large for the arena's first segment makes a new host
    segment after the standby started: the takeover hands it over before the call names it."""
    model = open_model(standby=1, arena_mb=1)
    standby = _standbys(model)[0]
    x = model.empty("x", (1 << 20,))  # 4 MiB: a new segment of the host's
    x[:] = np.arange(x.size, dtype=np.float32)
    os.kill(model.stats()["pid"], signal.SIGKILL)
    assert wait_for(lambda: model.stats()["pid"] == standby, 5.0 + SLACK_S)
    out = model.infer({"fault": fault_inputs("ok")["fault"], "x": x})
    np.testing.assert_array_equal(out["y"], np.arange(1, x.size + 1, dtype=np.float32))
    assert model.stats()["pid"] == standby
    assert model.stats()["bytes_copied_in"] < x.nbytes  # only the scalar: x is in place


def test_calls_in_flight_at_the_crash_fail(open_model):
    model = open_model(standby=1)
    standby = _standbys(model)[0]
    crashed = model.stats()["pid"]
    futures = [model.submit(fault_inputs("sleep", x=(2.0,))) for _ in range(3)]
    threading.Timer(0.2, os.kill, (crashed, signal.SIGKILL)).start()
    for future in futures:
        with pytest.raises(ope.WorkerCrashed):
            future.result(timeout=10.0)
    assert_works(model)
    assert model.stats()["pid"] == standby


def test_a_dead_standby_is_replaced_and_serving_goes_on(open_model):
    model = open_model(standby=1)
    standby = _standbys(model)[0]
    serving = model.stats()["pid"]
    os.kill(standby, signal.SIGKILL)
    assert wait_for(lambda: model.health()["standby"]["pids"] not in ([], [standby]), READY_S)
    health = model.health()
    assert model.stats()["pid"] == serving and health["restarts"] == 0
    assert health["state"] == "ready"
    [failure] = health["standby"]["failures"]
    assert f"standby pid {standby} killed by SIGKILL while idle" == failure["reason"]
    assert_works(model)
    assert model.stats()["pid"] == serving


def test_health_and_stats_show_the_standbys(open_model):
    model = open_model(standby=2, cpus=[0])
    pids = _standbys(model, 2)
    serving = model.stats()["pid"]
    for report in (model.health()["standby"], model.stats()["standby"]):
        assert report["wanted"] == 2 and report["ready"] == 2 and report["state"] == "ready"
        assert sorted(report["pids"]) == sorted(pids) and serving not in pids
        assert [w["state"] for w in report["workers"]] == ["ready", "ready"]
    for pid in pids:  # loaded like the serving worker: pinned, idle
        assert psutil.Process(pid).cpu_affinity() == [0]
        assert psutil.Process(pid).status() == psutil.STATUS_SLEEPING


def test_replicas_report_their_standbys(open_model):
    model = open_model(standby=1, replicas=2)
    for replica in model.replicas:
        _standbys(replica)
    listed = [r["standby"]["pids"] for r in model.stats()["replicas"]]
    assert all(len(pids) == 1 for pids in listed) and listed[0] != listed[1]
    assert [h["standby"]["ready"] for h in model.health()["replicas"]] == [1, 1]


def test_standby_is_an_out_of_process_option(faulty):
    with pytest.raises(TypeError, match="standby"):
        ope.load(faulty, out_of_process=False, standby=1)
    with pytest.raises(ValueError, match="standby"):
        ope.load(faulty, out_of_process=True, standby=-1)


@pytest.mark.parametrize("when", ["ready", "filling"])
def test_close_leaves_no_process(open_model, when):
    model = open_model(standby=2)
    pids = [model.stats()["pid"], *_standbys(model, 2)]
    if when == "filling":  # a standby dies and its replacement is loading at the close
        os.kill(pids[1], signal.SIGKILL)
        assert wait_for(lambda: "starting" in
                        [w["state"] for w in model.health()["standby"]["workers"]], READY_S)
        pids += [w["pid"] for w in model.health()["standby"]["workers"]]
    model.close()
    for pid in pids:
        assert not psutil.pid_exists(pid), f"pid {pid} outlived close()"
    assert model.health()["standby"]["state"] == "closed"
