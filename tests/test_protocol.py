"""The control protocol (ope/protocol.py): the TRANSITIONS table as tables of allowed and
refused conversations checked on both sides, the message decoder and the tensor-descriptor
decoder under fuzzing, and the mapping of ERROR messages to ope's error types.

Descriptors are decoded against a real arena: a host (Arena.create) and a worker attached to it
(Arena.attach), each of which has grown one segment of its own.
"""

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ope
from ope import protocol
from ope.arena import Arena, segment_names
from ope.protocol import (ERROR, HELLO, INFER, LOAD, READY, RESULT, SHUTDOWN, VERSION,
                          Conversation, decode_tensor)
from ope.ring import BLOCK_HEADER, LINE, RING_HEADER, Ring

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_OBJECTS = settings(FUZZ, max_examples=40)  # generating nested objects is what costs

# -- messages -----------------------------------------------------------------------------

H, W = "host", "worker"


def hello():
    return W, [HELLO, VERSION, {"pid": 1}]


def load():
    return H, [LOAD, "/packages/affine", {}]


def ready():
    return W, [READY, {}]


def infer(call):
    return H, [INFER, call, [["x", "float32", [1], 0, 4096, 4]]]


def result(call):
    return W, [RESULT, call, [], 0]


def error(call):
    return W, [ERROR, call, "ModelError", "boom", {"error_type": "KeyError"}]


def shutdown():
    return H, [SHUTDOWN]


START = [hello(), load(), ready()]

ALLOWED = {
    "hello": ([hello()], "hello", []),
    "load": ([hello(), load()], "loading", []),
    "ready": (START, "ready", []),
    "load fails": ([hello(), load(), error(None)], "failed", []),
    "one call": (START + [infer(1), result(1)], "ready", []),
    "a call fails": (START + [infer(1), error(1)], "ready", []),
    "calls in flight": (START + [infer(1), infer(2), infer(3), result(1), error(2)], "ready", [3]),
    "interleaved": (START + [infer(1), infer(2), result(1), infer(3), result(2), result(3)],
                    "ready", []),
    "any call ids": (START + [infer("a"), infer(7), result("a"), error(7)], "ready", []),
    "shutdown when idle": (START + [shutdown()], "closing", []),
    "shutdown after calls": (START + [infer(1), result(1), shutdown()], "closing", []),
    "draining": (START + [infer(1), infer(2), shutdown(), result(1), error(2)], "closing", []),
    "draining in part": (START + [infer(1), infer(2), shutdown(), result(1)], "closing", [2]),
}

# (sequence, index of the message refused)
REFUSED = {
    "nothing before hello": ([load()], 0),
    "host says hello": ([(H, [HELLO, VERSION, {}])], 0),
    "hello twice": ([hello(), hello()], 1),
    "worker loads": ([hello(), (W, load()[1])], 1),
    "ready before load": ([hello(), ready()], 1),
    "infer before ready": ([hello(), load(), infer(1)], 2),
    "infer before load": ([hello(), infer(1)], 1),
    "load twice": ([hello(), load(), load()], 2),
    "load after ready": (START + [load()], 3),
    "ready twice": (START + [ready()], 3),
    "result while loading": ([hello(), load(), result(1)], 2),
    "result with no call pending": (START + [result(1)], 3),
    "error with no call pending": (START + [error(1)], 3),
    "result for a call that is not the oldest": (START + [infer(1), infer(2), result(2)], 5),
    "error for a call that is not the oldest": (START + [infer(1), infer(2), error(2)], 5),
    "result for an unknown call": (START + [infer(1), result(9)], 4),
    "result twice": (START + [infer(1), result(1), result(1)], 5),
    "worker sends infer": (START + [(W, infer(1)[1])], 3),
    "host sends result": (START + [infer(1), (H, result(1)[1])], 4),
    "infer after shutdown": (START + [shutdown(), infer(1)], 4),
    "shutdown twice": (START + [shutdown(), shutdown()], 4),
    "shutdown before ready": ([hello(), load(), shutdown()], 2),
    "draining out of order": (START + [infer(1), infer(2), shutdown(), result(2)], 6),
    "draining past the last call": (START + [infer(1), shutdown(), result(1), result(1)], 6),
    "unknown message type": (START + [(H, [99, 1])], 3),
    **{f"{name} after failed": ([hello(), load(), error(None), message], 3)
       for name, message in [("hello", hello()), ("load", load()), ("ready", ready()),
                             ("infer", infer(1)), ("result", result(1)), ("error", error(1)),
                             ("shutdown", shutdown())]},
}


def sides():
    return Conversation("host"), Conversation("worker")


def feed(conversation, sender, message):
    if sender == conversation.side:
        conversation.sent(message)
    else:
        conversation.received(message)


@pytest.mark.parametrize("sequence,state,pending", ALLOWED.values(), ids=ALLOWED.keys())
def test_allowed_conversations_pass_on_both_sides(sequence, state, pending):
    for conversation in sides():
        for sender, message in sequence:
            feed(conversation, sender, protocol.unpack(protocol.pack(message)))
        assert conversation.state == state
        assert list(conversation.pending) == pending


@pytest.mark.parametrize("sequence,refused", REFUSED.values(), ids=REFUSED.keys())
def test_refused_conversations_raise_protocol_error_on_both_sides(sequence, refused):
    for conversation in sides():
        for sender, message in sequence[:refused]:
            feed(conversation, sender, message)
        with pytest.raises(ope.ProtocolError):
            feed(conversation, *sequence[refused])


def test_every_transition_in_the_table_is_exercised_by_an_allowed_conversation():
    seen = set()
    for sequence, _, _ in ALLOWED.values():
        conversation = Conversation("host")
        for sender, message in sequence:
            seen.add((conversation.state, sender, message[0]))
            feed(conversation, sender, message)
    assert seen == set(protocol.TRANSITIONS)


# -- decoding messages --------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", msgpack.packb({"a": 1}),
                                  msgpack.packb([]), msgpack.packb([0]), msgpack.packb([8]),
                                  msgpack.packb([SHUTDOWN, 1]), msgpack.packb([HELLO, 1]),
                                  msgpack.packb([READY, {}]) + b"\x00",
                                  msgpack.packb(["HELLO", 1, {}]), msgpack.packb([None])])
def test_unpack_refuses_what_is_not_a_message(data):
    with pytest.raises(ope.ProtocolError):
        protocol.unpack(data)


@pytest.mark.parametrize("message", [[[1]], [{}], [{"a": 1}, 2, 3]])
def test_unpack_refuses_an_unhashable_message_type(message):
    with pytest.raises(ope.ProtocolError):
        protocol.unpack(msgpack.packb(message))


def assert_valid_message(message):
    assert isinstance(message, list) and message
    assert message[0] in (HELLO, LOAD, READY, INFER, ERROR, RESULT, SHUTDOWN)


@FUZZ
@given(st.binary(max_size=64))
def test_unpack_of_arbitrary_bytes_gives_a_message_or_protocol_error(data):
    try:
        message = protocol.unpack(data)
    except ope.ProtocolError:
        return
    assert_valid_message(message)


SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats()
           | st.text(max_size=8) | st.binary(max_size=8))
OBJECTS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=12)
MESSAGE_LIKE = st.builds(lambda head, rest: [head, *rest],
                         st.sampled_from(list(range(0, 9))) | SCALARS,
                         st.lists(OBJECTS, max_size=5))


@FUZZ_OBJECTS
@given(OBJECTS | MESSAGE_LIKE)
def test_unpack_of_arbitrary_msgpack_objects_gives_a_message_or_protocol_error(obj):
    try:
        message = protocol.unpack(msgpack.packb(obj, use_bin_type=True))
    except ope.ProtocolError:
        return
    assert_valid_message(message)


@FUZZ_OBJECTS
@given(st.lists(st.tuples(st.sampled_from([H, W]), MESSAGE_LIKE), max_size=8))
def test_any_sequence_of_decoded_messages_passes_or_raises_protocol_error(steps):
    for conversation in sides():
        for sender, obj in steps:
            try:
                feed(conversation, sender, protocol.unpack(protocol.pack(obj)))
            except ope.ProtocolError:
                break


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ope.PackageError, ope.RequirementError, ope.SpecError,
                                 ope.ModelError, ope.ArenaFull, ope.ProtocolError])
def test_error_from_message_maps_known_names_to_their_types(cls):
    exc = protocol.error_from_message([ERROR, 1, cls.__name__, "what happened", {}])
    assert type(exc) is cls
    assert str(exc) == "what happened"


def test_a_model_error_keeps_its_type_name_and_traceback():
    fields = {"error_type": "KeyError", "traceback_text": "Traceback ...", "other": "dropped",
              "error_type_not_str": 3}
    exc = protocol.error_from_message([ERROR, 1, "ModelError", "boom", fields])
    assert type(exc) is ope.ModelError
    assert exc.error_type == "KeyError" and exc.traceback_text == "Traceback ..."
    assert not hasattr(exc, "other")


@pytest.mark.parametrize("type_name", ["KeyError", "WorkerCrashed", "OpeError", "ModelClosed",
                                       "", None, 3, "x" * 10000])
def test_error_from_message_maps_unknown_names_to_model_error(type_name):
    exc = protocol.error_from_message([ERROR, 1, type_name, "what happened", {}])
    assert type(exc) is ope.ModelError
    assert "what happened" in str(exc)
    assert len(str(exc)) < 3000


@pytest.mark.parametrize("text,fields", [(None, {}), (b"bytes", {}), ("text", None),
                                         ("text", [1, 2])])
def test_error_from_message_with_malformed_fields_is_a_model_error(text, fields):
    exc = protocol.error_from_message([ERROR, 1, "SpecError", text, fields])
    assert type(exc) is ope.ModelError


@pytest.mark.parametrize("type_name", [[1], {"a": 1}])
def test_error_from_message_with_an_unhashable_type_name_is_a_model_error(type_name):
    message = protocol.unpack(protocol.pack([ERROR, 1, type_name, "text", {}]))
    assert type(protocol.error_from_message(message)) is ope.ModelError


def test_error_fields_round_trip_and_cut_long_texts():
    exc = ope.ModelError("boom", error_type="ValueError", traceback_text="x" * 100 + "END")
    fields = protocol.error_fields(exc, limit=10)
    assert fields == {"error_type": "ValueError", "traceback_text": "xxxxxxxEND"}
    back = protocol.error_from_message([ERROR, 1, "ModelError", "boom", fields])
    assert back.traceback_text.endswith("END")
    assert protocol.error_fields(ope.SpecError("bad"), limit=10) == {}


# -- tensor descriptors -------------------------------------------------------------------


@pytest.fixture
def arenas():
    """(host, worker) with a grown segment each: host ids 0 and 1, worker id 2."""
    host = Arena.create(queue_bytes=4096, ring_bytes=64 * 1024, max_bytes=8 << 20)
    try:
        worker = Arena.attach(host.prefix, first_id=2, max_bytes=8 << 20)
        for arena in (host, worker):  # grow by one segment, then leave the rings empty
            seg_id, payload, ring = arena.alloc(128 * 1024)
            ring.release(payload)
        yield host, worker
        worker.close()
    finally:
        host.close()
    assert segment_names(host.prefix) == []


def ring_of(block):
    """The Ring a Block's payload belongs to: segment 0 names its ring offset in its header
    (ope/arena.py), other segments hold their ring at offset 4096."""
    offset = block.mapping.load64(40) or 4096
    return Ring(block.mapping, offset)


def recording(peer_block, made):
    def make(seg_id, payload, nbytes):
        block = peer_block(seg_id, payload, nbytes)
        made.append(block)
        return block
    return make


def array_bounds(array):
    start = array.__array_interface__["data"][0]
    return start, start + array.nbytes


def _ring_offset(arena, seg_id):
    return arena.segment_mapping(0).load64(40) if seg_id == 0 else 4096


@st.composite
def payloads_near_a_ring(draw, ring_offset):
    """A payload offset around a ring's edges: most bad, some valid."""
    line = draw(st.integers(-3, 40) | st.integers(0, 2 ** 12))
    skew = draw(st.sampled_from([0, 0, 0, 1, -1, 8, LINE - 1]))
    return ring_offset + RING_HEADER + BLOCK_HEADER + line * LINE + skew


@st.composite
def near_valid_descriptors(draw, arena, seg_ids):
    """A well-formed descriptor of one of the peer's segments, with a payload and a size that
    may or may not fit its ring."""
    seg_id = draw(st.sampled_from(seg_ids))
    payload = draw(payloads_near_a_ring(_ring_offset(arena, seg_id)))
    nbytes = draw(st.sampled_from([0, 8, 64, 4096]) | st.integers(0, 300_000))
    dtype = draw(st.sampled_from(sorted(protocol.NUMERIC_DTYPES)))
    itemsize = protocol.NUMERIC_DTYPES[dtype].itemsize
    shape = draw(st.sampled_from([[-1], [nbytes // itemsize], [1, -1], [nbytes]]))
    return ["t", dtype, shape, seg_id, payload, nbytes]


NAMES = st.text(max_size=4) | st.none() | st.integers() | st.binary(max_size=2)
DTYPE_NAMES = (st.sampled_from([*protocol.NUMERIC_DTYPES, "string", "object", "<f4", "", "f16"])
               | st.none() | st.integers() | st.lists(st.text(max_size=2), max_size=2))
SHAPES = (st.lists(st.integers(-2, 70000) | st.sampled_from([-1, 2 ** 40, 2 ** 70]), max_size=3)
          | st.sampled_from([[-1], [], None, 5, "12", [1.5], [[1]], {"a": 1}]))
SEGMENT_IDS = (st.sampled_from([0, 1, 2, 3, 4, -1, -2, 2 ** 64 + 2, 10 ** 40, True, 2.0, None,
                                "0", "../x", [0]]) | st.integers())
SIZES = (st.integers(-70, 70000) | st.sampled_from([2 ** 63, 2 ** 64, -(2 ** 63) - 1, 1.0, None,
                                                    "8", [8]]))


@pytest.mark.parametrize("side", ["host", "worker"])
@FUZZ
@given(data=st.data())
def test_bad_descriptors_raise_protocol_error_and_never_view_outside_a_ring(arenas, side, data):
    host, worker = arenas
    arena, peer_ids = (host, [2]) if side == "host" else (worker, [0, 1])
    near = st.sampled_from(peer_ids).flatmap(
        lambda seg_id: payloads_near_a_ring(_ring_offset(arena, seg_id)))
    payload = data.draw(near | st.integers(-2 ** 64, 2 ** 65) | st.floats() | st.none())
    desc = data.draw(st.one_of(
        near_valid_descriptors(arena, peer_ids),
        st.tuples(NAMES, DTYPE_NAMES, SHAPES, SEGMENT_IDS, st.just(payload), SIZES).map(list),
        st.tuples(NAMES, DTYPE_NAMES, SHAPES, st.lists(st.text(max_size=2) | st.integers(),
                                                      max_size=4)).map(list),
        st.lists(SCALARS, max_size=8), SCALARS))
    made = []
    try:
        name, array = decode_tensor(desc, recording(arena.peer_block, made))
    except ope.ProtocolError:
        return
    assert type(name) is str and isinstance(array, np.ndarray)
    if not made:  # a string tensor: its contents travelled inline
        assert array.dtype.kind == "U"
        return
    block, = made
    ring = ring_of(block)
    area_start = ring.offset + RING_HEADER
    assert area_start + BLOCK_HEADER <= block.offset, "a view before the ring's first payload"
    assert block.offset + block.nbytes <= area_start + ring.area, "a view past the ring"
    if side == "host":  # a view the host gives back must be a payload, or the release misfires
        assert ring.contains(block.offset, block.nbytes)
    start, end = array_bounds(array)
    assert block.address <= start and end <= block.address + block.nbytes
    assert block.sealed == (side == "worker")


def test_a_worker_output_decodes_on_the_host_to_a_view_of_its_bytes(arenas):
    host, worker = arenas
    seg_id, payload, ring = worker.alloc(6 * 4)
    assert seg_id == 2
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    memoryview(worker.segment_mapping(seg_id))[payload:payload + 24] = expected.tobytes()
    name, array = decode_tensor(["y", "float32", [2, 3], seg_id, payload, 24], host.peer_block)
    assert name == "y"
    np.testing.assert_array_equal(array, expected)
    assert ring.used > 0
    del array  # the host's view gives the block back to the worker's ring
    assert ring.used == 0


def test_a_host_input_decodes_on_the_worker_to_a_sealed_view_of_its_bytes(arenas):
    host, worker = arenas
    seg_id, payload, ring = host.alloc(8)
    memoryview(host.segment_mapping(seg_id))[payload:payload + 8] = bytes(range(8))
    name, array = decode_tensor(["x", "uint8", [8], seg_id, payload, 8], worker.peer_block)
    assert name == "x" and array.tobytes() == bytes(range(8))
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1
    del array  # the worker's view does not give the host's block back
    assert ring.used > 0
    ring.release(payload)


@pytest.mark.parametrize("shape", [[3], [1, 3], [3, 1]])
def test_a_string_descriptor_round_trips(shape):
    strings = np.array(["a", "bc", ""]).reshape(shape)
    desc = protocol.string_descriptor("s", strings)
    name, array = decode_tensor(protocol.unpack(protocol.pack([READY, desc]))[1], None)
    assert name == "s"
    np.testing.assert_array_equal(array, strings)


@pytest.mark.parametrize("desc", [
    ["y", "float32", [2], 2, "offset", 8],
    ["y", "float32", [3], 2, None, 8],
    ["y", "float32", [2], 2, 0, 8],
    ["y", "float32", [2], 2, 2 ** 70, 8],
    ["y", "float32", [2], 2, None, -8],
    ["y", "float32", [2], 99, 0, 8],
    ["y", "float32", [2], 3, 0, 8],
    ["y", "float32", [2], "2", None, 8],
    ["y", "complex64", [1], 2, None, 8],
    ["y", "float32", [3], 2, None, 8],
    [1, "float32", [2], 2, None, 8],
    ["s", "string", [2], ["a", 1]],
    ["s", "float32", [2], ["a", "b"]],
    ["s", "string", [3], ["a", "b"]],
    ["y", "float32", [2], 2, None],
])
def test_a_table_of_bad_descriptors_raises_protocol_error(arenas, desc):
    """``None`` as the payload is replaced by a real, live payload of the worker's ring."""
    host, worker = arenas
    seg_id, payload, ring = worker.alloc(8)
    desc = [payload if field is None and i == 4 else field for i, field in enumerate(desc)]
    with pytest.raises(ope.ProtocolError):
        decode_tensor(desc, host.peer_block)
    if ring.used:  # no Block was made; one that was made gave the block back when dropped
        ring.release(payload)


def test_the_host_refuses_a_descriptor_naming_its_own_segment(arenas):
    host, _ = arenas
    seg_id, payload, ring = host.alloc(64)  # e.g. a model.empty buffer the caller holds
    try:
        with pytest.raises(ope.ProtocolError):
            decode_tensor(["y", "uint8", [64], seg_id, payload, 64], host.peer_block)
    finally:
        assert ring.used > 0, "dropping the 'output' gave the caller's block back"
        ring.release(payload)
