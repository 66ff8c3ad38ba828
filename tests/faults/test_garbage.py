"""Garbage in shared memory from a buggy worker is a ProtocolError for the host, never a
crash, and the worker is replaced."""

import pytest

import ope
from fault_package import assert_works, fault_inputs


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
