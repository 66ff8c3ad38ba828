"""ope's native core: shared mappings, self-releasing blocks, the data ring allocator, the
message queue, the tensor-frame codec (frames straight from and into the arena), the worker's
loop for calls, numpy's memory hook that makes a model's arrays in the worker's ring, the host's session with a worker (its lone call, sends and receives), the success path of the spec checks, a model's call
counters, and spin-then-futex waits. The sources are ope_native/src, one file per concept.

Every byte layout the processes share is declared once, in ope_native/src/layout.h, and
exported here: ``LAYOUT`` (offsets, magics, message codes, frame fields, by their C names) and
``DTYPE_NAMES``/``DTYPE_ITEMSIZES`` (indexed by a frame's dtype code). Python reads them from
here; the layouts are described for readers in ope/bridge/ring.py, ope/bridge/channel.py and ope/bridge/protocol.py.
"""

from ope_native._native import (
    BLOCK_HEADER, CALL_ANSWERED, CALL_NOT_PLAIN, CALL_NOT_SENT, CALL_SENT, CALL_UNCHECKED,
    DTYPE_ITEMSIZES, DTYPE_NAMES, LAYOUT, LINE, QUEUE_HEADER, RING_HEADER, SPIN_S, Block,
    CallStats, Mapping, Session, check_plain, decode_frame, encode_frame, exit_with_parent,
    keep_kept_inputs, memhook_counts, memhook_new, pack_frame, release_inputs, serve_calls,
    unpack_frame,
)

__all__ = ["BLOCK_HEADER", "CALL_ANSWERED", "CALL_NOT_PLAIN", "CALL_NOT_SENT", "CALL_SENT",
           "CALL_UNCHECKED", "DTYPE_ITEMSIZES", "DTYPE_NAMES", "LAYOUT", "LINE", "QUEUE_HEADER",
           "RING_HEADER", "SPIN_S", "Block", "CallStats", "Session", "Mapping", "check_plain",
           "decode_frame", "encode_frame", "exit_with_parent", "keep_kept_inputs", "memhook_counts",
           "memhook_new", "pack_frame",
           "release_inputs", "serve_calls", "unpack_frame"]
