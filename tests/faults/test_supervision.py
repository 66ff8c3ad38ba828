"""Supervision: a worker that dies while idle is seen within the crash bound, and one model's
trouble never delays another's."""

import os
import re
import signal
import time

import pytest

import ope
from fault_package import SLACK_S, SLOW_RELOAD_ENV, assert_works, fault_inputs, wait_for


# -- supervision: one model's trouble never delays another's -------------------------------

@pytest.mark.parametrize("restart", ["lazy", "eager"])
def test_a_worker_that_dies_while_idle_is_seen_within_the_crash_bound(open_model, restart):
    model = open_model(restart=restart)
    pid = model.health()["pid"]
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    assert wait_for(lambda: model.health()["failures"], 0.1 + SLACK_S), model.health()
    assert time.monotonic() - start < 0.1 + SLACK_S
    failure = model.health()["failures"][-1]["reason"]
    assert "idle" in failure and "SIGKILL" in failure
    if restart == "lazy":
        assert model.health()["state"] == "restarting" and model.health()["pid"] is None
    else:
        assert wait_for(lambda: model.health()["state"] == "ready", 30), model.health()
        assert model.health()["pid"] not in (None, pid)
    assert_works(model)
    assert model.health()["pid"] not in (None, pid) and model.health()["restarts"] == 1


def test_a_slow_restart_does_not_delay_another_models_memory_limit(open_model, tmp_path):
    slow = open_model(restart="eager", env_vars={SLOW_RELOAD_ENV: str(tmp_path / "loaded")})
    bounded = open_model(memory_limit_mb=100)
    with pytest.raises(ope.WorkerCrashed):
        slow.infer(fault_inputs("sigkill"))
    assert wait_for(lambda: slow.health()["state"] == "starting", 5.0), slow.health()
    start = time.monotonic()
    with pytest.raises(ope.MemoryLimitExceeded) as caught:
        bounded.infer(fault_inputs("balloon_to", x=(800.0,)))  # would reach 800 MiB in ~2 s
    took = time.monotonic() - start
    rss_mib = float(re.search(r"memory limit exceeded: (\d+) MiB", str(caught.value)).group(1))
    assert rss_mib < 300, f"killed at {rss_mib} MiB, {took:.2f} s after the call started"
    assert took < 0.5 + SLACK_S
    assert slow.health()["state"] == "starting", "the slow restart ended first: nothing shown"
    assert_works(bounded)
