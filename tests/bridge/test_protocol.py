"""The control protocol (ope/bridge/protocol.py): the TRANSITIONS table as tables of allowed and
refused conversations checked on both sides, the message and frame decoders under fuzzing, the
frame layout against ope_native's, and the mapping of ERROR messages to ope's error types.
Descriptors decoded against a real arena: tests/bridge/test_descriptors.py.
"""

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ope
import ope_native
from ope.bridge import protocol
from ope.bridge.protocol import (ERROR, HELLO, INFER, LOAD, READY, RESULT, SHUTDOWN, VERSION,
                          Conversation)

from conftest import CODES, STRING, itemsize_of

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FUZZ_OBJECTS = settings(FUZZ, max_examples=40)  # generating nested objects is what costs

# -- messages -----------------------------------------------------------------------------

H, W = "host", "worker"
FLOAT32 = protocol.DTYPE_CODES[np.dtype("float32")]
L = ope_native.LAYOUT
MARKER = bytes([L["FRAME_MARKER"]])  # a tensor frame's first byte


def hello():
    return W, [HELLO, VERSION, {"pid": 1}]


def load():
    return H, [LOAD, "/packages/affine", {}]


def ready():
    return W, [READY, {}]


def infer(call):
    return H, [INFER, call, [("x", FLOAT32, 4, (1,), 0, 4096, 4)]]


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
    "any u64 call ids": (START + [infer(2 ** 64 - 1), infer(0), result(2 ** 64 - 1), error(0)],
                         "ready", []),
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


REPLIES = [[RESULT, 7, {}, 0], [RESULT, 8, {}, 0], [ERROR, 7, "SpecError", "bad", {}],
           [ERROR, 8, "SpecError", "bad", {}], [READY, {}], [HELLO, VERSION, {}]]


@pytest.mark.parametrize("sequence", [v[0] for v in ALLOWED.values()], ids=ALLOWED.keys())
@pytest.mark.parametrize("reply", REPLIES, ids=lambda m: f"{protocol._NAMES[m[0]]}-{m[1]}")
def test_a_lone_call_may_skip_the_conversation_exactly_when_the_table_leaves_it_unchanged(
        sequence, reply):
    """answers_alone() is the host's shortcut for a call with none other in flight: it must
    agree with telling the conversation the INFER and the reply, and finding it as it was."""
    shortcut = Conversation("host")
    for sender, message in sequence:
        feed(shortcut, sender, message)
    told = Conversation("host")
    for sender, message in sequence:
        feed(told, sender, message)
    before = (told.state, list(told.pending))
    try:
        told.sent([INFER, 7])
        told.received(reply)
        unchanged = (told.state, list(told.pending)) == before
    except ope.ProtocolError:
        unchanged = False
    assert shortcut.answers_alone(reply, 7) == unchanged


# -- decoding messages --------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", MARKER, b"\x93\x01", msgpack.packb({"a": 1}),
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


U64 = st.integers(0, 2 ** 64 - 1)
FRAMES = (st.builds(lambda call: [INFER, call, []], U64)
          | st.builds(lambda call, copied: [RESULT, call, [], copied], U64, U64))
WIRE_MESSAGES = MESSAGE_LIKE.map(msgpack.packb) | FRAMES.map(protocol.pack)


@FUZZ_OBJECTS
@given(st.lists(st.tuples(st.sampled_from([H, W]), WIRE_MESSAGES), max_size=8))
def test_any_sequence_of_decoded_messages_passes_or_raises_protocol_error(steps):
    for conversation in sides():
        for sender, data in steps:
            try:
                feed(conversation, sender, protocol.unpack(data))
            except ope.ProtocolError:
                break


@pytest.mark.parametrize("message", [[INFER, 1, []], [RESULT, 1, [], 0]])
def test_calls_sent_as_msgpack_instead_of_frames_are_refused(message):
    with pytest.raises(ope.ProtocolError, match="tensor frame"):
        protocol.unpack(msgpack.packb(message))


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


def test_error_fields_round_trip_and_bound_their_texts():
    exc = ope.ModelError("boom", error_type="Value\udc80Error",
                         traceback_text="START" + "x" * 1000 + "END")
    fields = protocol.error_fields(exc, limit=200)
    assert fields["error_type"] == "Value\\udc80Error"  # a lone surrogate, escaped
    text = fields["traceback_text"]
    assert len(text) <= 200 and "[truncated 872 characters]" in text
    sent = protocol.pack([ERROR, 1, "ModelError", "boom", fields])
    back = protocol.error_from_message(protocol.unpack(sent))
    assert back.traceback_text.startswith("START") and back.traceback_text.endswith("END")
    assert protocol.error_fields(ope.SpecError("bad"), limit=10) == {}


# -- tensor frames ------------------------------------------------------------------------

def extent(dims):
    """Product of the non-zero dims: numpy's limit applies to it even when a dim is 0."""
    return int(np.prod([d for d in dims if d], dtype=object))


@st.composite
def entries(draw):
    """A well-formed descriptor: nbytes agrees with shape and itemsize."""
    code = draw(st.sampled_from(CODES))
    itemsize = itemsize_of(code, draw(st.integers(0, 5)))
    shape = tuple(draw(st.lists(st.integers(0, 9) | st.sampled_from([2 ** 20, 2 ** 31]),
                                max_size=4).filter(lambda dims: extent(dims) < 2 ** 58)))
    nbytes = int(np.prod(shape, dtype=object)) * itemsize
    name = draw(st.text(min_size=1, max_size=12).filter(lambda n: len(n.encode()) <= 60))
    return (name, code, itemsize, shape, draw(U64.filter(lambda v: v < 2 ** 63)),
            draw(st.integers(0, 2 ** 63 - 1)), nbytes)


@FUZZ
@given(kind=st.sampled_from([INFER, RESULT]), call=U64, copied=U64,
       descriptors=st.lists(entries(), max_size=4))
def test_a_frame_round_trips(kind, call, copied, descriptors):
    message = [INFER, call, descriptors] if kind == INFER else [RESULT, call, descriptors, copied]
    assert protocol.unpack(protocol.pack(message)) == message


def a_frame():
    return protocol.pack([RESULT, 9, [("y", FLOAT32, 4, (2, 3), 2, 4160, 24),
                                      ("s", STRING, 12, (2,), 2, 8256, 24)], 48])


@FUZZ
@given(data=st.data())
def test_a_mutated_frame_decodes_consistently_or_raises_protocol_error(data):
    frame = bytearray(a_frame())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(frame) - 1))
        frame[at] = data.draw(st.integers(0, 255))
    frame = bytes(frame[:data.draw(st.integers(0, len(frame)))]) + data.draw(st.binary(max_size=9))
    try:
        message = protocol.unpack(frame)
    except ope.ProtocolError:
        return
    assert_valid_message(message)
    for name, code, itemsize, shape, seg_id, payload, nbytes in message[2]:
        assert type(name) is str and name and code in CODES and len(shape) <= 32
        assert itemsize % 4 == 0 if code == STRING else itemsize == itemsize_of(code)
        assert int(np.prod(shape, dtype=object)) * itemsize == nbytes
        assert 0 <= seg_id < 2 ** 63 and 0 <= payload < 2 ** 63


@FUZZ
@given(st.binary(max_size=120))
def test_arbitrary_bytes_behind_the_frame_marker_give_a_message_or_protocol_error(tail):
    try:
        message = protocol.unpack(MARKER + tail)
    except ope.ProtocolError:
        return
    assert message[0] in (INFER, RESULT)


def patched(frame, at, data):
    return frame[:at] + data + frame[at + len(data):]


ENTRY = L["FRAME_HEADER"]  # the first entry starts after the frame header
NAME = ENTRY + L["E_SHAPE"] + 2 * 8  # a_frame()'s first entry: rank 2, then its name "y"
SECOND = NAME + 8  # the name padded to 8 bytes, then the second entry
BAD_FRAMES = {
    "truncated header": lambda f: f[:ENTRY - 4],
    "message type not a call": lambda f: patched(f, L["F_KIND"], bytes([READY])),
    "reserved field set": lambda f: patched(f, L["F_RESERVED"], b"\x01"),
    "more entries than bytes": lambda f: patched(f, L["F_COUNT"], b"\x03"),
    "fewer entries than bytes": lambda f: patched(f, L["F_COUNT"], b"\x01"),
    "trailing bytes": lambda f: f + bytes(8),
    "unknown dtype code": lambda f: patched(f, ENTRY + L["E_CODE"], bytes([len(ope.spec.DTYPES)])),
    "itemsize of another dtype": lambda f: patched(f, ENTRY + L["E_ITEMSIZE"], b"\x08"),
    "string itemsize not UCS-4": lambda f: patched(f, SECOND + L["E_ITEMSIZE"], b"\x0b"),
    "nbytes disagrees with the shape": lambda f: patched(f, ENTRY + L["E_NBYTES"], b"\x19"),
    "a dim that overflows": lambda f: patched(f, ENTRY + L["E_SHAPE"], b"\xff" * 8),
    "rank past 32": lambda f: patched(f, ENTRY + L["E_RANK"], bytes([L["FRAME_MAX_DIMS"] + 1])),
    "empty name": lambda f: patched(f, ENTRY + L["E_NAME_LEN"], b"\x00\x00"),
    "name longer than the entry": lambda f: patched(f, ENTRY + L["E_NAME_LEN"], b"\x09"),
    "name not UTF-8": lambda f: patched(f, NAME, b"\xff"),
    "segment id past 2**63": lambda f: patched(f, ENTRY + L["E_SEG"], b"\xff" * 8),
    "offset past 2**63": lambda f: patched(f, ENTRY + L["E_OFFSET"], b"\xff" * 8),
}


@pytest.mark.parametrize("corrupt", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_a_table_of_bad_frames_raises_protocol_error(corrupt):
    assert protocol.unpack(a_frame())[0] == RESULT  # the frame they corrupt is fine
    with pytest.raises(ope.ProtocolError):
        protocol.unpack(corrupt(a_frame()))


def test_a_frame_has_its_fields_where_the_layout_puts_them():
    """The field widths of ope/bridge/protocol.py's frame table, at ope_native.LAYOUT's offsets."""
    frame = a_frame()

    def field(fmt, at):
        return struct.unpack_from("<" + fmt, frame, at)[0]

    assert field("B", L["F_MARKER"]) == L["FRAME_MARKER"]
    assert (field("B", L["F_KIND"]), field("H", L["F_COUNT"]), field("I", L["F_RESERVED"]),
            field("Q", L["F_CALL_ID"]), field("Q", L["F_COPIED"])) == (RESULT, 2, 0, 9, 48)
    widths = {"E_CODE": "B", "E_RANK": "B", "E_NAME_LEN": "H", "E_ITEMSIZE": "I", "E_SEG": "Q",
              "E_OFFSET": "Q", "E_NBYTES": "Q"}
    entry = tuple(field(fmt, ENTRY + L[name]) for name, fmt in widths.items())
    assert entry == (FLOAT32, 2, 1, 4, 2, 4160, 24)
    assert struct.unpack_from("<2Q", frame, ENTRY + L["E_SHAPE"]) == (2, 3)
    assert frame[NAME:SECOND] == b"y" + bytes(7)
    assert field("B", SECOND + L["E_CODE"]) == STRING
    assert len(frame) == SECOND + L["ENTRY_HEADER"] + 8 + 8  # one dim, the name "s" padded


def test_the_dtype_codes_are_ope_natives_table_and_agree_with_numpy():
    names, itemsizes = ope_native.DTYPE_NAMES, ope_native.DTYPE_ITEMSIZES
    assert ope.spec.DTYPES == names and len(itemsizes) == len(names)
    assert names[STRING] == "string" and itemsizes[STRING] == 0  # 4 bytes x the width
    for code, name in enumerate(names):
        if code != STRING:
            assert protocol.DTYPE_CODES[np.dtype(name)] == code
            assert itemsizes[code] == np.dtype(name).itemsize == protocol.DTYPES_BY_CODE[code].itemsize
