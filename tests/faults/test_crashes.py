"""Crashes, timeouts, load failures and the restart policy: each fault surfaces as its typed
error, the next call gets a fresh worker, and other models go on."""

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import ope
from fault_package import SLACK_S, assert_works, fault_inputs, fault_package


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


def test_a_worker_killed_just_before_submit_fails_the_future_not_submit(open_model):
    """submit raises only for the caller's mistakes: a worker found dead as the call is sent
    is that call's error, delivered by its future, as a job waiting on futures expects. (Had
    the supervisor already replaced the worker, the call is simply served.)"""
    model = open_model()
    for _ in range(3):
        pid = model.stats()["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.001)  # dead, not reaped: the host reads its exit status
        time.sleep(0.01)  # the host sees the death (the worker's pidfd), the supervisor not yet
        future = model.submit(fault_inputs("ok"))
        try:
            future.result(timeout=30)
        except ope.WorkerCrashed as exc:
            assert "SIGKILL" in str(exc)
        assert_works(model)


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
