"""The control protocol between a host and its worker.

Messages are lists whose first element is the message type, encoded with msgpack except for
the tensor frames below; they travel through the channel (ope/bridge/channel.py) while tensor bytes
stay in the arena (ope/bridge/arena.py). The conversation, and the only messages allowed next at
each point::

    state      who     message                                         next state
    start      worker  HELLO   [1, version, info]                       hello
    hello      host    LOAD    [2, package_path, options]               loading
    loading    worker  READY   [3, info]                                ready
    loading    worker  ERROR   [5, None, type, message, fields]         failed
    ready      host    INFER   [4, call_id, [descriptor...]]            ready (one more call pending)
    ready      worker  RESULT  [6, call_id, [descriptor...], copied]    ready (oldest pending call done)
    ready      worker  ERROR   [5, call_id, type, message, fields]      ready (oldest pending call done)
    ready      host    SHUTDOWN [7]                                     closing
    closing    worker  RESULT / ERROR for calls still pending           closing

The worker answers calls in the order they came, so a RESULT or ERROR must carry the call id
of the oldest pending call. :class:`Conversation` checks every message against this table on
both sides; anything else is a :class:`ope.ProtocolError`. Two shortcuts keep the table's
rule without its cost per call: the worker's loop in C (ope_native.serve_calls) answers INFER
in state "ready" and leaves every other message to the Conversation; and the host sends a call
with no other in flight without telling its Conversation (ope_native.Session.call). C accepts
only that call's RESULT; any other answer goes to :meth:`Conversation.answers_alone`, which
says whether the table takes it and leaves the conversation as it was. The first message's
layout ``[HELLO, version, ...]`` never changes, so a host can refuse a worker runtime of
another protocol version before anything else is read.

An ERROR names the ope error type (ope/errors.py) and carries its extra fields (for a
ModelError: the model's exception type and traceback text), so the host raises the same error
an in-process call would have raised.

INFER and RESULT, the messages of every call, travel as binary *tensor frames* instead of
msgpack: a side puts a call's tensors in the arena and makes their frame in one C call
(ope.bridge.arena.Arena.encode), and the other side checks the frame and makes its views in one
(Arena.decode), where msgpack and Python-built descriptors cost microseconds per call.
:func:`unpack` tells the two apart by the first byte, 0xC1, which msgpack never uses. Both
decode to the lists in the table above, so :class:`Conversation` checks them alike. Frame
layout (little-endian)::

     0  u8   0xC1
     1  u8   message type           INFER or RESULT
     2  u16  count                  tensor entries that follow
     4  u32  reserved, 0
     8  u64  call id
    16  u64  copied                 bytes the sender copied into the arena for this message
    24  entries, each a multiple of 8 bytes long:
         0  u8   dtype code         index into ope.spec.DTYPES
         1  u8   rank               at most 32
         2  u16  name length        bytes of UTF-8, at least 1
         4  u32  itemsize           the dtype's; for "string", 4 bytes (UCS-4) x width
         8  u64  segment id
        16  u64  payload offset     in that segment
        24  u64  nbytes             = product(shape) x itemsize
        32  u64  shape[rank]
            name, zero-padded to a multiple of 8

Every tensor, strings included (numpy "U" arrays are fixed-width UCS-4), lies in the arena;
a descriptor is the tuple ``(name, code, itemsize, shape, segment id, payload offset, nbytes)``.
A frame whose fields do not add up (sizes, rank, codes, lengths, UTF-8) is refused before
any view is made, and then each range is checked against the ring of the peer's segment it
names; whether the tensors match the model's spec is checked afterwards by ope/spec.py, as
in-process. :func:`pack` and :func:`unpack` without an arena give a frame's descriptors
(ope_native.pack_frame and unpack_frame, the same C code without the arena): tools and
tests read frames with them.

The numbers in the tables above (message types, the marker, offsets, dtype codes) are declared
once, in ope_native/src/layout.h; this module reads them from ope_native.
"""

import collections
import functools

import msgpack
import numpy as np

import ope_native
from ope import errors
from ope.errors import ProtocolError

__all__ = [
    "VERSION", "HELLO", "LOAD", "READY", "INFER", "ERROR", "RESULT", "SHUTDOWN",
    "Conversation", "pack", "unpack", "frame_message", "dtype_code", "string_dtype",
    "DTYPE_CODES", "DTYPES_BY_CODE", "STRING_CODE",
    "error_fields", "error_from_message",
]

VERSION = 2  # 2: INFER and RESULT as tensor frames
_L = ope_native.LAYOUT
HELLO, LOAD, READY, INFER, ERROR, RESULT, SHUTDOWN = (
    _L["MSG_HELLO"], _L["MSG_LOAD"], _L["MSG_READY"], _L["MSG_INFER"], _L["MSG_ERROR"],
    _L["MSG_RESULT"], _L["MSG_SHUTDOWN"])
_NAMES = {HELLO: "HELLO", LOAD: "LOAD", READY: "READY", INFER: "INFER", ERROR: "ERROR",
          RESULT: "RESULT", SHUTDOWN: "SHUTDOWN"}
_LENGTHS = {HELLO: 3, LOAD: 3, READY: 2, INFER: 3, ERROR: 5, RESULT: 4, SHUTDOWN: 1}

# (state, sender, message) -> next state.
TRANSITIONS = {
    ("start", "worker", HELLO): "hello",
    ("hello", "host", LOAD): "loading",
    ("loading", "worker", READY): "ready",
    ("loading", "worker", ERROR): "failed",
    ("ready", "host", INFER): "ready",
    ("ready", "worker", RESULT): "ready",
    ("ready", "worker", ERROR): "ready",
    ("ready", "host", SHUTDOWN): "closing",
    ("closing", "worker", RESULT): "closing",
    ("closing", "worker", ERROR): "closing",
}
_ANSWERS = (RESULT, ERROR)

_FRAMES = (INFER, RESULT)
_FRAME_MARKER = _L["FRAME_MARKER"]
_packer = msgpack.Packer(use_bin_type=True)
# msgpack >= 1.0 defaults: str as str, arrays as lists, map keys str/bytes only. Calling it
# without keywords saves their parsing on every message.
_unpackb = msgpack.unpackb
_pack_frame = ope_native.pack_frame
_unpack_frame = ope_native.unpack_frame


def pack(message):
    kind = message[0]
    if kind == INFER:
        return _pack_frame(INFER, message[1], 0, message[2])
    if kind == RESULT:
        return _pack_frame(RESULT, message[1], message[3], message[2])
    return _packer.pack(message)


def unpack(data, arena=None):
    """Decode one message and check its shape; garbage raises ProtocolError. A tensor frame's
    tensors are views on ``arena`` (the receiver's ope.bridge.arena.Arena); without one,
    descriptors."""
    if data and data[0] == _FRAME_MARKER:
        return _unpack_tensor_frame(data) if arena is None else arena.decode(data)
    try:
        message = _unpackb(data)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {exc}") from None
    if not isinstance(message, list) or not message or type(message[0]) is not int \
            or message[0] not in _LENGTHS:
        raise ProtocolError(f"not an ope message: {message!r:.200}")
    if message[0] in _FRAMES:
        raise ProtocolError(f"{_NAMES[message[0]]} must travel as a tensor frame: {message!r:.200}")
    if len(message) != _LENGTHS[message[0]]:
        raise ProtocolError(f"{_NAMES[message[0]]} message with {len(message)} fields: {message!r:.200}")
    return message


def _unpack_tensor_frame(data):
    try:
        return frame_message(*_unpack_frame(data))
    except ValueError as exc:
        raise ProtocolError(f"malformed {len(data)}-byte message: {exc}") from None


def frame_message(kind, call_id, copied, tensors):
    """The message a decoded tensor frame carries; its tensors are descriptors (:func:`unpack`)
    or arrays (ope.bridge.arena.Arena.decode)."""
    if kind == INFER:
        return [INFER, call_id, tensors]
    if kind == RESULT:
        return [RESULT, call_id, tensors, copied]
    raise ProtocolError(f"tensor frame of message type {kind}")


# sender -> state -> {message type: next state}: the table above, indexed for a lookup per message.
_NEXT = {}
for (_state, _sender, _kind), _after in TRANSITIONS.items():
    _NEXT.setdefault(_sender, {}).setdefault(_state, {})[_kind] = _after
_NOTHING = {}


class Conversation:
    """One side's view of the conversation: checks each message against TRANSITIONS and
    tracks the calls in flight (oldest first)."""

    __slots__ = ("side", "peer", "state", "pending")

    def __init__(self, side):
        self.side = side
        self.peer = "worker" if side == "host" else "host"
        self.state = "start"
        self.pending = collections.deque()

    def sent(self, message):
        self._advance(self.side, message)

    def received(self, message):
        self._advance(self.peer, message)

    def _advance(self, sender, message):
        kind = message[0]
        after = _NEXT[sender].get(self.state, _NOTHING).get(kind)
        if after is None:
            raise ProtocolError(f"{sender} sent {_NAMES.get(kind, kind)!s:.20} in state {self.state!r}")
        if kind == INFER:
            self.pending.append(message[1])
        elif kind in _ANSWERS and self.state != "loading":
            self._answer(message[1], kind)
        self.state = after

    def answers_alone(self, message, call_id):
        """Whether ``message`` from the worker answers call ``call_id``, sent in state "ready"
        with no other call pending and not told to this conversation: such an INFER and its
        answer leave the conversation as they found it, so a side may skip telling it both."""
        return (self.state == "ready" and not self.pending and message[0] in _ANSWERS
                and message[1] == call_id)

    def _answer(self, call_id, kind):
        if not self.pending:
            raise ProtocolError(f"worker sent {_NAMES[kind]} for call {call_id!r} with no call pending")
        if call_id != self.pending[0]:
            raise ProtocolError(
                f"worker answered call {call_id!r} but call {self.pending[0]!r} is the oldest pending")
        self.pending.popleft()


STRING_CODE = _L["STRING_CODE"]
DTYPE_CODES = {np.dtype(name): code for code, name in enumerate(ope_native.DTYPE_NAMES)
               if code != STRING_CODE}
DTYPES_BY_CODE = tuple(np.dtype(name) if code != STRING_CODE else None
                       for code, name in enumerate(ope_native.DTYPE_NAMES))


def dtype_code(dtype):
    """The frame's code for arrays of ``dtype``; None for a dtype no spec allows. Strings must
    be in native byte order (ope.spec makes them so)."""
    code = DTYPE_CODES.get(dtype)
    if code is None and dtype.kind == "U" and dtype.isnative:
        return STRING_CODE
    return code


@functools.lru_cache(maxsize=64)  # the peer picks the widths: the cache must stay bounded
def string_dtype(itemsize):
    """The numpy dtype of a string tensor whose elements take ``itemsize`` bytes (UCS-4)."""
    return np.dtype(f"U{itemsize // 4}")


_WIRE_FIELDS = ("error_type", "traceback_text")
# Errors a worker may report; anything else it claims is reported as a ModelError.
_WIRE_ERRORS = {cls.__name__: cls for cls in (
    errors.PackageError, errors.RequirementError, errors.SpecError, errors.ModelError,
    errors.InputWriteError, errors.ArenaFull, errors.ProtocolError, errors.EnvError)}


def error_fields(exc, limit):
    """The extra fields of an ope error for an ERROR message, texts by ope.errors' text rule
    (bounded_text) to at most ``limit`` characters."""
    return {k: errors.bounded_text(getattr(exc, k), limit) for k in _WIRE_FIELDS
            if isinstance(getattr(exc, k, None), str)}


def error_from_message(message):
    """The exception an ERROR message describes, ready to raise."""
    _, _, type_name, text, fields = message
    cls = _WIRE_ERRORS.get(type_name) if isinstance(type_name, str) else None
    if cls is None or not isinstance(text, str) or not isinstance(fields, dict):
        return errors.ModelError(f"worker reported {type_name!r:.100}: {text!r:.2000}")
    if issubclass(cls, errors.ModelError):
        return cls(text, **{k: v for k, v in fields.items() if k in _WIRE_FIELDS and isinstance(v, str)})
    return cls(text)
