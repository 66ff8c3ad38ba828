"""The control protocol between a host and its worker.

Messages are msgpack arrays whose first element is the message type; they travel through the
channel (ope/channel.py) while tensor bytes stay in the arena (ope/arena.py). The conversation,
and the only messages allowed next at each point::

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
both sides; anything else is a :class:`ope.ProtocolError`. The first message's layout
``[HELLO, version, ...]`` never changes, so a host can refuse a worker runtime of another
protocol version before anything else is read.

An ERROR names the ope error type (ope/errors.py) and carries its extra fields (for a
ModelError: the model's exception type and traceback text), so the host raises the same error
an in-process call would have raised.

A tensor descriptor is ``[name, dtype, shape, segment id, payload offset, nbytes]`` for numeric
tensors and ``[name, "string", shape, [str, ...]]`` for string tensors, whose (small) contents
travel inline. Descriptors are checked as they are decoded (:func:`decode_tensor`); whether the
tensors match the model's spec is checked afterwards by ope/spec.py, as in-process.
"""

import collections

import msgpack
import numpy as np

from ope import errors
from ope.errors import ProtocolError
from ope.spec import DTYPES

__all__ = [
    "VERSION", "HELLO", "LOAD", "READY", "INFER", "ERROR", "RESULT", "SHUTDOWN",
    "Conversation", "pack", "unpack", "decode_tensor", "string_descriptor", "NUMERIC_DTYPES",
    "DTYPE_NAMES", "error_fields", "error_from_message",
]

VERSION = 1
HELLO, LOAD, READY, INFER, ERROR, RESULT, SHUTDOWN = 1, 2, 3, 4, 5, 6, 7
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

_packer = msgpack.Packer(use_bin_type=True)
# msgpack >= 1.0 defaults: str as str, arrays as lists, map keys str/bytes only. Calling it
# without keywords saves their parsing on every message.
_unpackb = msgpack.unpackb


def pack(message):
    return _packer.pack(message)


def unpack(data):
    """Decode one message and check its shape; garbage raises ProtocolError."""
    try:
        message = _unpackb(data)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {exc}") from None
    if not isinstance(message, list) or not message or type(message[0]) is not int \
            or message[0] not in _LENGTHS:
        raise ProtocolError(f"not an ope message: {message!r:.200}")
    if len(message) != _LENGTHS[message[0]]:
        raise ProtocolError(f"{_NAMES[message[0]]} message with {len(message)} fields: {message!r:.200}")
    return message


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

    def _answer(self, call_id, kind):
        if not self.pending:
            raise ProtocolError(f"worker sent {_NAMES[kind]} for call {call_id!r} with no call pending")
        if call_id != self.pending[0]:
            raise ProtocolError(
                f"worker answered call {call_id!r} but call {self.pending[0]!r} is the oldest pending")
        self.pending.popleft()


NUMERIC_DTYPES = {name: np.dtype(name) for name in DTYPES if name != "string"}
DTYPE_NAMES = {dtype: name for name, dtype in NUMERIC_DTYPES.items()}


def string_descriptor(name, array):
    return [name, "string", list(array.shape), array.ravel().tolist()]


def decode_tensor(desc, peer_block):
    """(name, array) for a descriptor the peer sent. ``peer_block(seg, offset, nbytes)`` makes
    the Block, after checking the range against the arena. Anything malformed, or a size that
    does not match the shape, raises ProtocolError."""
    try:
        if len(desc) == 4:
            name, dtype, shape, strings = desc
            if dtype != "string" or not all(type(s) is str for s in strings):
                raise TypeError("a 4-field descriptor must hold a list of str")
            array = np.array(strings, dtype=str).reshape(shape)
        else:
            name, dtype, shape, seg_id, payload, nbytes = desc
            array = np.ndarray(shape, NUMERIC_DTYPES[dtype], peer_block(seg_id, payload, nbytes))
            if array.nbytes != nbytes:
                raise ValueError(f"{nbytes} bytes do not hold shape {shape} of {dtype}")
        if type(name) is not str:
            raise TypeError("tensor name is not a str")
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ProtocolError(f"malformed tensor descriptor {desc!r:.200}: {exc}") from None
    return name, array


_WIRE_FIELDS = ("error_type", "traceback_text")
# Errors a worker may report; anything else it claims is reported as a ModelError.
_WIRE_ERRORS = {cls.__name__: cls for cls in (
    errors.PackageError, errors.RequirementError, errors.SpecError, errors.ModelError,
    errors.ArenaFull, errors.ProtocolError)}


def error_fields(exc, limit):
    """The extra fields of an ope error for an ERROR message, texts cut to ``limit`` chars."""
    return {k: getattr(exc, k)[-limit:] for k in _WIRE_FIELDS if isinstance(getattr(exc, k, None), str)}


def error_from_message(message):
    """The exception an ERROR message describes, ready to raise."""
    _, _, type_name, text, fields = message
    cls = _WIRE_ERRORS.get(type_name) if isinstance(type_name, str) else None
    if cls is None or not isinstance(text, str) or not isinstance(fields, dict):
        return errors.ModelError(f"worker reported {type_name!r:.100}: {text!r:.2000}")
    if cls is errors.ModelError:
        return cls(text, **{k: v for k, v in fields.items() if k in _WIRE_FIELDS and isinstance(v, str)})
    return cls(text)
