"""ope's native core: shared mappings, self-releasing blocks, the data ring allocator, the
message queue, the tensor-frame codec (frames straight from and into the arena), the worker's
loop for calls, the host's lone call, the success path of the spec checks, a model's call
counters, and spin-then-futex waits. See ope_native/_native.c; the byte layouts it implements
are documented in ope/ring.py, ope/channel.py and ope/protocol.py."""

from ope_native._native import (
    BLOCK_HEADER, CALL_ANSWERED, CALL_NOT_PLAIN, CALL_NOT_SENT, CALL_SENT, CALL_UNCHECKED, LINE,
    QUEUE_HEADER, RING_HEADER, SPIN_S, Block, CallStats, Mapping, call_alone, check_plain,
    decode_frame, encode_frame, exit_with_parent, keep_kept_inputs, pack_frame, release_inputs,
    serve_calls, unpack_frame,
)

__all__ = ["BLOCK_HEADER", "CALL_ANSWERED", "CALL_NOT_PLAIN", "CALL_NOT_SENT", "CALL_SENT",
           "CALL_UNCHECKED", "LINE", "QUEUE_HEADER", "RING_HEADER", "SPIN_S", "Block", "CallStats",
           "Mapping", "call_alone", "check_plain", "decode_frame", "encode_frame",
           "exit_with_parent", "keep_kept_inputs", "pack_frame", "release_inputs", "serve_calls", "unpack_frame"]
