"""The worker's request loop (workers/worker.py) driven directly: a Worker serves in a thread
of the test over a real arena pair, and the test plays the host on the other end of the
channel. While the model is ready, calls are answered by ope_native.serve_calls; everything it
leaves to Python (an error, outputs that need the spec's check, other messages, a bad frame)
must end exactly as the Python loop would end it.
"""

import threading

import numpy as np
import pytest

from ope.bridge import protocol
from ope.bridge.arena import Arena
from ope.errors import ModelError, ProtocolError, SpecError
from workers.worker import Worker

from conftest import attach_worker

TIMEOUT_S = 10.0


class Host:
    """The host's end: sends messages, receives and checks the worker's answers."""

    def __init__(self, arena):
        self.arena = arena
        self.conversation = protocol.Conversation("host")

    def send(self, message, data=None):
        self.conversation.sent(message)
        assert self.arena.channel.send(protocol.pack(message) if data is None else data)

    def receive(self):
        data = self.arena.channel.receive(TIMEOUT_S)
        assert data is not None, "the worker did not answer"
        message = protocol.unpack(data, self.arena)
        self.conversation.received(message)
        return message

    def infer(self, call_id, tensors):
        frame = self.arena.encode(protocol.INFER, call_id, tensors)[0]
        self.send([protocol.INFER, call_id], frame)
        return self.receive()


@pytest.fixture
def serving(probe):
    """(host, worker, thread outcome) with the probe package loaded in a serving Worker."""
    host_arena = Arena.create(queue_bytes=64 * 1024, ring_bytes=1 << 20, max_bytes=64 << 20)
    worker_arena = attach_worker(host_arena, max_bytes=64 << 20)
    worker, outcome = Worker(worker_arena), {}

    def serve():
        try:
            worker.serve()
        except BaseException as exc:  # noqa: BLE001 (the outcome is what the test checks)
            outcome["raised"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    host = Host(host_arena)
    try:
        assert host.receive()[0] == protocol.HELLO
        host.send([protocol.LOAD, probe.path, {}])
        assert host.receive()[0] == protocol.READY
        yield host, worker, outcome
    finally:
        host_arena.channel.close()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
        worker_arena.close()
        host_arena.close()


def probe_inputs(behaviour, n=3):
    return {"x": np.arange(2 * n, dtype=np.float32).reshape(n, 2),
            "behaviour": np.array(behaviour)}


def test_calls_in_a_row_are_answered_in_order_with_the_model_outputs(serving):
    host, worker, _ = serving
    for call_id in range(1, 51):
        reply = host.infer(call_id, probe_inputs("ok", n=call_id % 4 + 1))
        assert reply[:2] == [protocol.RESULT, call_id]
        n = call_id % 4 + 1
        np.testing.assert_array_equal(reply[2]["y"], np.arange(2 * n, dtype=np.float32).reshape(n, 2) * 2)
        assert list(reply[2]["label"]) == ["ok"] * n
    assert worker.conversation.state == "ready" and not worker.conversation.pending


@pytest.mark.parametrize("behaviour, error, words", [
    ("raise", ModelError, "probe asked to fail"),
    ("not_a_dict", SpecError, "int"),
    ("missing_output", SpecError, "label"),
])
def test_a_call_left_to_python_answers_error_and_the_next_call_is_served(serving, behaviour, error, words):
    host, worker, _ = serving
    reply = host.infer(1, probe_inputs(behaviour))
    assert reply[:2] == [protocol.ERROR, 1]
    raised = protocol.error_from_message(reply)
    assert type(raised) is error and words in str(raised)
    assert host.infer(2, probe_inputs("ok"))[:2] == [protocol.RESULT, 2]
    assert worker.conversation.state == "ready" and not worker.conversation.pending


def test_a_model_error_carries_the_models_traceback(serving):
    host, _, _ = serving
    raised = protocol.error_from_message(host.infer(1, probe_inputs("raise")))
    assert "in explode" in raised.traceback_text and raised.error_type == "ProbeFailure"


def test_outputs_that_need_converting_are_converted_by_the_spec_check(serving):
    host, _, _ = serving
    reply = host.infer(1, probe_inputs("list_output"))  # a list of str for a string output
    assert reply[0] == protocol.RESULT and list(reply[2]["label"]) == ["ok"] * 3


def test_shutdown_ends_the_loop(serving):
    host, worker, outcome = serving
    assert host.infer(1, probe_inputs("ok"))[0] == protocol.RESULT
    host.send([protocol.SHUTDOWN])
    worker_thread_ended = _wait_until(lambda: not worker.running)
    assert worker_thread_ended and "raised" not in outcome


def test_a_corrupt_call_frame_ends_the_loop_with_a_protocol_error(serving):
    host, _, outcome = serving
    frame = bytearray(host.arena.encode(protocol.INFER, 1, probe_inputs("ok"))[0])
    frame[24 + 8:24 + 16] = (10 ** 9).to_bytes(8, "little")  # the first entry's segment id
    host.send([protocol.INFER, 1], bytes(frame))
    assert _wait_until(lambda: "raised" in outcome)
    assert isinstance(outcome["raised"], ProtocolError)


def _wait_until(condition, timeout_s=TIMEOUT_S):
    event = threading.Event()
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        event.wait(0.01)
    return condition()
