"""The host's lone call in one crossing into C (ope_native.Session.call, used by
ope/host/out_of_process.py's _call_alone), driven over a real arena pair with the test playing
the worker: its answer is queued before the call, so the call's single wait finds it. Every
outcome must leave the inputs as the general path would: given back and unsealed once the call
is over, still held (and sealed) when the call is left to Python. With the spec's checks, only
tensors that pass them as they are may go through C; anything else is left to Python's check.
"""

import numpy as np
import pytest

import ope_native
from ope import TensorSpec
from ope.bridge import protocol
from ope.bridge.arena import Arena
from ope.spec import input_plan, output_plan

from conftest import attach_worker, describe

KIB = 1024
SPIN_S = ope_native.SPIN_S
HEAD, TAIL = ope_native.LAYOUT["Q_HEAD"], ope_native.LAYOUT["Q_TAIL"]  # queue header words


@pytest.fixture
def pair():
    host = Arena.create(queue_bytes=4 * KIB, ring_bytes=64 * KIB, max_bytes=4 << 20)
    worker = attach_worker(host)
    yield host, worker
    worker.close()
    host.close()


def call_alone(host, call_id, tensors, spin_s=SPIN_S, checks=None, stats=None):
    """A lone call through a Session on ``host``'s channel, as the host makes it: (outcome, the
    spin of the next wait, bytes copied in, reply, held, bindings); with ``checks`` the
    session checks the caller's tensors by those rows."""
    counted = stats or ope_native.CallStats(1)
    session = session_of(host, checks or ((), ()), counted)
    session.spin_s = spin_s
    before = counted.snapshot()[2]
    outcome, reply, held, bindings = session.call(call_id, tensors, checks is not None)
    return outcome, session.spin_s, counted.snapshot()[2] - before, reply, held, bindings


def session_of(host, checks=((), ()), stats=None):
    channel = host.channel
    return ope_native.Session(channel.mapping, channel.out_q, channel.in_q, host.encoding,
                              host.decoding, checks, stats)


def answer(worker, call_id, outputs):
    """The worker's RESULT for ``call_id``, queued ahead of the call."""
    frame = worker.encode(protocol.RESULT, call_id, outputs)[0]
    assert worker.channel.send(frame)


def inputs(host):
    """An ordinary array (copied in) and an arena array (sent in place, sealed meanwhile)."""
    _, block = host.new_block(16)
    arena_array = np.ndarray((4,), np.float32, block)
    arena_array[...] = 2
    return {"copied": np.arange(4, dtype=np.float32), "in_place": arena_array}


def test_its_own_result_ends_the_call_with_outputs_and_the_inputs_given_back(pair):
    host, worker = pair
    tensors = inputs(host)
    answer(worker, 7, {"y": np.full(3, 5, np.int64)})
    before = host.used_bytes()
    stats = ope_native.CallStats(1)
    outcome, spin_s, copied, reply, held, bindings = call_alone(host, 7, tensors, stats=stats)
    # The worker's first message carries no gap stamp: no spin on the next wait.
    assert outcome == ope_native.CALL_ANSWERED and held is None and spin_s == 0.0
    assert bindings is None, "no checks asked for"
    assert copied == tensors["copied"].nbytes
    assert stats.snapshot()[2:4] == (copied, 3 * 8), "bytes copied in, and out by the worker"
    np.testing.assert_array_equal(reply["y"], [5, 5, 5])
    assert tensors["in_place"].flags.writeable
    del reply  # the output's block goes back to the worker's ring, the inputs went already
    assert host.used_bytes() == before
    sent = protocol.unpack(worker.channel.receive(0.0), worker)  # what the worker got
    assert sent[:2] == [protocol.INFER, 7]
    np.testing.assert_array_equal(sent[2]["copied"], tensors["copied"])
    np.testing.assert_array_equal(sent[2]["in_place"], 2)


def replies(worker):
    """What a worker may answer a lone call 7 with, other than its RESULT: the bytes queued."""
    return {
        "nothing in the spin window": None,
        "another call's result": worker.encode(protocol.RESULT, 8, {"y": np.ones(1)})[0],
        "an error": protocol.pack([protocol.ERROR, 7, "ModelError", "boom", {}]),
        # its own call id, but a tensor in a segment that does not exist
        "a bad frame": protocol.pack([protocol.RESULT, 7, [describe("y", np.ones(1), 4, 64)], 0]),
    }


@pytest.mark.parametrize("case", ["nothing in the spin window", "another call's result",
                                  "an error", "a bad frame"])
def test_anything_but_its_own_result_is_left_to_python_with_the_inputs_held(pair, case):
    host, worker = pair
    tensors = inputs(host)
    queued = replies(worker)[case]
    before = host.used_bytes()
    if queued is not None:
        assert worker.channel.send(queued)
    outcome, _, copied, reply, held, _ = call_alone(host, 7, tensors, spin_s=0.001)
    assert outcome == ope_native.CALL_SENT and reply == queued
    scratch, sealed = held
    assert len(scratch) == 1 and sealed == [tensors["in_place"]]
    assert not tensors["in_place"].flags.writeable, "sealed while the worker may read it"
    assert host.used_bytes() > before
    ope_native.release_inputs(scratch, sealed)
    assert host.used_bytes() == before and tensors["in_place"].flags.writeable


def test_a_closed_queue_is_not_sent_to_and_the_inputs_are_given_back(pair):
    host, _ = pair
    tensors = inputs(host)
    before = host.used_bytes()
    host.channel.close()
    outcome, _, _, reply, held, _ = call_alone(host, 7, tensors)
    assert (outcome, reply, held) == (ope_native.CALL_NOT_SENT, None, None)
    assert host.used_bytes() == before and tensors["in_place"].flags.writeable


def test_a_corrupt_incoming_queue_is_reported_as_the_reply(pair):
    host, _ = pair
    tensors = inputs(host)
    host.channel.mapping.store64(host.channel.in_q + HEAD, 12345)  # not a record boundary
    outcome, _, _, reply, held, _ = call_alone(host, 7, tensors)
    assert outcome == ope_native.CALL_SENT and isinstance(reply, ValueError)
    assert "corrupt queue" in str(reply)
    ope_native.release_inputs(*held)


def test_a_corrupt_outgoing_queue_is_not_sent_to(pair):
    host, _ = pair
    tensors = inputs(host)
    before = host.used_bytes()
    host.channel.mapping.store64(host.channel.out_q + TAIL, 12345)  # past head
    outcome, _, _, reply, held, _ = call_alone(host, 7, tensors)
    assert outcome == ope_native.CALL_NOT_SENT and isinstance(reply, ValueError) and held is None
    assert host.used_bytes() == before and tensors["in_place"].flags.writeable


def test_inputs_that_do_not_encode_raise_and_hold_nothing(pair):
    host, worker = pair
    tensors = {**inputs(host), "bad": np.array([object()])}
    before = host.used_bytes()
    with pytest.raises(TypeError, match="not an array a frame carries"):
        call_alone(host, 7, tensors)
    assert host.used_bytes() == before and tensors["in_place"].flags.writeable
    assert worker.channel.receive(0.0) is None, "nothing was sent"


def checks():
    """The spec's rows for inputs() and a float32 output "y" of size n."""
    specs_in = (TensorSpec("copied", "float32", ("n",)), TensorSpec("in_place", "float32", (4,)))
    specs_out = (TensorSpec("y", "float32", ("n",)), TensorSpec("z", "int64", ()))
    return input_plan(specs_in).native_rows, output_plan(specs_out).native_rows


def test_with_the_checks_a_call_whose_tensors_pass_them_ends_in_c(pair):
    host, worker = pair
    tensors = inputs(host)
    answer(worker, 7, {"z": np.array(3), "y": np.zeros(4, np.float32)})
    outcome, _, _, reply, held, bindings = call_alone(host, 7, tensors, checks=checks())
    assert outcome == ope_native.CALL_ANSWERED and held is None
    assert bindings == {"n": 4}
    assert list(reply) == ["y", "z"], "outputs in the spec's order, as Python's check gives"
    assert tensors["in_place"].flags.writeable


@pytest.mark.parametrize("bad", ["float64", "a list", "a missing input", "an unknown input"])
def test_with_the_checks_inputs_that_do_not_pass_as_they_are_are_not_sent(pair, bad):
    host, worker = pair
    tensors = inputs(host)
    if bad == "float64":
        tensors["copied"] = tensors["copied"].astype(np.float64)
    elif bad == "a list":
        tensors["copied"] = [0.0, 1.0, 2.0, 3.0]
    elif bad == "a missing input":
        del tensors["copied"]
    else:
        tensors["extra"] = np.zeros(1, np.float32)
    before = host.used_bytes()
    outcome, _, copied, reply, held, bindings = call_alone(host, 7, tensors, checks=checks())
    assert (outcome, copied, reply, held, bindings) == (ope_native.CALL_NOT_PLAIN, 0, None, None, None)
    assert host.used_bytes() == before and tensors["in_place"].flags.writeable
    assert worker.channel.receive(0.0) is None, "nothing was sent"


@pytest.mark.parametrize("outputs", [
    {"y": np.zeros(5, np.float32), "z": np.array(3)},  # n = 5 against n = 4 from the inputs
    {"y": np.zeros(4, np.float64), "z": np.array(3)},
    {"y": np.zeros(4, np.float32)},
], ids=["symbol", "dtype", "missing"])
def test_with_the_checks_outputs_that_do_not_pass_are_left_to_python(pair, outputs):
    host, worker = pair
    tensors = inputs(host)
    answer(worker, 7, outputs)
    before = host.used_bytes()
    outcome, _, _, reply, held, bindings = call_alone(host, 7, tensors, checks=checks())
    assert outcome == ope_native.CALL_UNCHECKED and held is None and bindings == {"n": 4}
    assert sorted(reply) == sorted(outputs)
    del reply
    assert host.used_bytes() == before and tensors["in_place"].flags.writeable


def test_a_sessions_sends_and_receives_go_through_the_channel_and_share_its_spin(pair):
    host, worker = pair
    session = session_of(host)
    assert session.send(b"load", 0.0)
    assert worker.channel.receive(timeout_s=0) == b"load"
    assert session.receive(0.0) is None
    assert worker.channel.send(b"ready", timeout_s=0)
    session.spin_s = 0.0
    assert session.receive(0.0) == b"ready"
    assert session.spin_s == SPIN_S  # the worker answered at once: the next wait spins
    host.channel.close()
    assert not session.send(b"late", 0.0) and session.receive(0.0) is None


def test_a_session_refuses_what_is_not_a_channel_codec_or_checks(pair):
    host, _ = pair
    channel = host.channel
    with pytest.raises(TypeError):
        ope_native.Session(channel.mapping, channel.out_q, channel.in_q, host.encoding,
                           host.decoding, (), None)
    with pytest.raises(TypeError):
        ope_native.Session(b"no mapping", channel.out_q, channel.in_q, host.encoding,
                           host.decoding, ((), ()), None)
    with pytest.raises(RuntimeError):
        ope_native.Session.__new__(ope_native.Session).receive(0.0)
