"""The control channel: two message queues in shared memory, one per direction.

Each queue has a single producer and a single consumer and carries small messages (msgpack,
or the tensor frames of calls: ope/bridge/protocol.py); tensor bytes never pass through it, only
their descriptors. A waiter spins for up to :data:`SPIN_S` and then sleeps on a futex: a
quick answer is caught without a wake-up (tens of microseconds on a VM, milliseconds once a
CPU has idled for a while), and an idle worker costs no CPU. It spins only while the other
side answers quickly once it has what it waits for: each message carries in its queue's
header how long its sender had left the channel alone before sending it (``gap_ns``), and
the receiver spins next time only if that was under twice the spin window (ope_native's
queue_pop keeps the rule). Wake-ups, of either side, never count: on a VM they can take
hundreds of microseconds, which would otherwise look like slow answers and keep both sides
asleep. While spinning a waiter yields the CPU at once if the other side last ran on the same
CPU, since the answer cannot come while it holds that CPU.

Queue layout (little-endian, 64-byte aligned; fields that different processes write sit on
different cache lines)::

       0  u64 magic              "OPEQUE3"
       8  u64 capacity           bytes of the data area, a multiple of 8
      64  u64 head               bytes ever written                       [producer, release]
     128  u64 tail               bytes ever read                          [consumer, release]
     192  u32 data_bell          +1 after each publish; futex word         [producer]
     196  u32 consumer_sleeping  1 while the consumer sleeps on data_bell  [consumer]
     200  u32 producer_cpu       CPU of the last publish (hint, relaxed)   [producer]
     208  u64 gap_ns             ns the producer had left the channel alone
                                 before its last publish: since its
                                 previous publish here or its last consume
                                 of the queue it reads (hint, relaxed)     [producer]
     216  u64 pushed_ns          CLOCK_MONOTONIC ns of the last publish    [producer, own]
     256  u32 space_bell         +1 after each consume; futex word         [consumer]
     260  u32 producer_sleeping  1 while a full queue's producer sleeps    [producer]
     264  u32 consumer_cpu       CPU of the last consume (hint, relaxed)   [consumer]
     272  u64 popped_ns          CLOCK_MONOTONIC ns of the last consume    [consumer, own]
     320  u32 closed             non-zero once either side closed it
     384  data area, ``capacity`` bytes

    record at ``head % capacity``: u32 length, u32 reserved, the message, zero padding to 8.
    A record never wraps: when it does not fit before the end, the producer writes the length
    0xFFFFFFFF there (a wrap marker) and starts the record at offset 0.

The producer copies a record in, then publishes it by a release store of ``head``; the consumer
loads ``head`` with acquire order, copies the record out and frees it by a release store of
``tail``. A sleeper sets its ``*_sleeping`` flag, re-checks, and futex-waits on the bell; the
other side bumps the bell and wakes only if the flag is set (a Dekker pair, both seq_cst), so a
wake-up is never lost and rarely paid. Fields marked "own" are read only by the side that
writes them, for its gap stamps. A consumer validates every length and position the
other process wrote before copying, so a corrupt queue raises instead of reading out of bounds.
The implementation is ope_native (ope_native/src/queue.c); the offsets above are declared once,
in ope_native (``LAYOUT``), and read from there.
"""

import ope_native

from ope.errors import ProtocolError

__all__ = ["Channel", "QUEUE_HEADER", "SPIN_S", "corrupt_queue"]

QUEUE_HEADER = ope_native.QUEUE_HEADER
_CLOSED = ope_native.LAYOUT["Q_CLOSED"]

SPIN_S = ope_native.SPIN_S  # why this long: ope_native/src/queue.c, at queue_pop_record


def corrupt_queue(direction, exc):
    """The ProtocolError for ope_native's ValueError ``exc`` about the ``direction`` queue
    ("outgoing" or "incoming"): the peer wrote garbage into the queue's header or records."""
    return ProtocolError(f"{direction} control queue is corrupt: {exc}")


class Channel:
    """One end of a pair of queues in a mapping: sends on ``out_q``, receives on ``in_q``."""

    __slots__ = ("mapping", "out_q", "in_q", "spin_s")

    def __init__(self, mapping, out_q, in_q, spin_s=SPIN_S):
        self.mapping = mapping
        self.out_q = out_q
        self.in_q = in_q
        self.spin_s = spin_s

    @staticmethod
    def init_queue(mapping, offset, size):
        mapping.queue_init(offset, size)

    def send(self, message, timeout_s=-1.0):
        """Queue ``message`` (bytes); False if the queue is closed or stayed full past the
        timeout (negative: no timeout). Its gap stamp counts from this side's last receive too."""
        try:
            return self.mapping.queue_push(self.out_q, message, timeout_s, self.spin_s, self.in_q)
        except ValueError as exc:
            raise corrupt_queue("outgoing", exc) from None

    def receive(self, timeout_s=-1.0):
        """The next message, or None on timeout or when the queue was closed and drained.
        Spins next time only if the sender's gap stamp was short (ope_native)."""
        try:
            data, self.spin_s = self.mapping.queue_pop(self.in_q, timeout_s, self.spin_s)
        except ValueError as exc:
            raise corrupt_queue("incoming", exc) from None
        return data

    def close(self):
        """Close both directions and wake whoever waits on them (safe from any thread)."""
        self.mapping.queue_close(self.out_q)
        self.mapping.queue_close(self.in_q)

    @property
    def closed(self):
        return bool(self.mapping.load32(self.in_q + _CLOSED))
