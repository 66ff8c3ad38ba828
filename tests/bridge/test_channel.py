"""The control channel (ope/bridge/channel.py): two single-producer single-consumer queues in one
mapping, driven through ``Channel`` objects on both ends, in one process (threads) and across
a forked child.

Waiting is synchronised on the queue's own ``*_sleeping`` words (a side is known to be blocked
once it sleeps on its futex), never on sleeps. Corrupt queues are read in a forked child whose
queue ends where its file ends, so an out-of-bounds access is a SIGBUS the test reports.
"""

import collections
import os
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forked import memfd_mapping, reap, run_in_child
import ope_native
from ope.bridge.channel import QUEUE_HEADER, SPIN_S, Channel
from ope.errors import ProtocolError

QUEUE_BYTES = 4096
CAPACITY = (QUEUE_BYTES - QUEUE_HEADER) // 8 * 8
L = ope_native.LAYOUT
RECORD_HEADER = L["RECORD_HEADER"]
MAX_MESSAGE = (CAPACITY // 2 - RECORD_HEADER) // 8 * 8  # a record (header, padded) fills half
HEAD, TAIL, CONSUMER_SLEEPING, PRODUCER_SLEEPING = (
    L["Q_HEAD"], L["Q_TAIL"], L["Q_CONSUMER_SLEEPING"], L["Q_PRODUCER_SLEEPING"])
MAGIC, CAPACITY_WORD, GAP_NS = L["Q_MAGIC"], L["Q_CAPACITY"], L["Q_GAP_NS"]
NO_GAP = 2 ** 64 - 1  # the sender had not used the channel before
WRAP = L["RECORD_WRAP"]
JOIN_S = 10.0  # generous bound for a thread or child that should finish at once

_PATTERN = bytes(range(256)) * (MAX_MESSAGE // 256 + 2)


def message(i, size):
    """A message of ``size`` bytes whose contents depend on ``i``."""
    start = i % 251
    return _PATTERN[start:start + size]


def channel_pair(mapping=None):
    """(host, worker) Channels over two fresh queues at offsets 0 and QUEUE_BYTES."""
    mapping = mapping or memfd_mapping(2 * QUEUE_BYTES)
    Channel.init_queue(mapping, 0, QUEUE_BYTES)
    Channel.init_queue(mapping, QUEUE_BYTES, QUEUE_BYTES)
    return Channel(mapping, out_q=0, in_q=QUEUE_BYTES), Channel(mapping, out_q=QUEUE_BYTES, in_q=0)


@pytest.fixture
def pair():
    host, worker = channel_pair()
    yield host, worker
    host.close()


def wait_until_sleeping(channel, queue, word):
    """Block until the side that waits on ``queue`` sleeps on its futex (the word is 1)."""
    # wait32 spins on the word (GIL released) and returns once it changed from 0.
    assert channel.mapping.wait32(queue + word, 0, JOIN_S, JOIN_S), "the other side never slept"


class Call(threading.Thread):
    """Runs ``fn()`` in a daemon thread and keeps what it returned or raised."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc

    def finish(self, timeout_s=JOIN_S):
        self.join(timeout_s)
        assert not self.is_alive(), "call still blocked"
        if self.error is not None:
            raise self.error
        return self.result


# -- round trips --------------------------------------------------------------------------


def test_capacity_is_what_the_layout_says(pair):
    host, _ = pair
    assert host.mapping.load64(host.out_q + CAPACITY_WORD) == CAPACITY


def test_messages_of_every_size_up_to_half_the_capacity_round_trip(pair):
    host, worker = pair
    for size in range(MAX_MESSAGE + 1):
        assert host.send(message(size, size), timeout_s=0)
        assert worker.receive(timeout_s=0) == message(size, size)
        assert worker.send(message(size + 1, size), timeout_s=0)
        assert host.receive(timeout_s=0) == message(size + 1, size)


@pytest.mark.parametrize("size", [MAX_MESSAGE + 1, CAPACITY // 2, CAPACITY, 10 * CAPACITY])
def test_an_oversized_message_raises_overflow_error(pair, size):
    host, worker = pair
    with pytest.raises(OverflowError):
        host.send(bytes(size), timeout_s=0)
    assert worker.receive(timeout_s=0) is None
    assert host.send(b"still usable", timeout_s=0)
    assert worker.receive(timeout_s=0) == b"still usable"


def test_odd_sizes_wrap_around_the_queue_in_order(pair):
    host, worker = pair
    sizes = [1, 13, 333, 1001, MAX_MESSAGE - 1, 7, 0, 517]
    sent = received = 0
    while received < 400:
        # Fill as far as the queue takes, then drain part of it: records land everywhere.
        while host.send(message(sent, sizes[sent % len(sizes)]), timeout_s=0):
            sent += 1
        for _ in range((sent - received + 1) // 2):
            assert worker.receive(timeout_s=0) == message(received, sizes[received % len(sizes)])
            received += 1
    while received < sent:
        assert worker.receive(timeout_s=0) == message(received, sizes[received % len(sizes)])
        received += 1
    assert worker.receive(timeout_s=0) is None
    assert host.mapping.load64(host.out_q + HEAD) > 20 * CAPACITY  # it went round many times


def test_a_wrap_marker_is_written_when_a_record_does_not_fit_before_the_end(pair):
    host, worker = pair
    first = CAPACITY // 2 - RECORD_HEADER  # leaves the second half minus one record header
    assert host.send(bytes(first - RECORD_HEADER), timeout_s=0)
    assert worker.receive(timeout_s=0) == bytes(first - RECORD_HEADER)
    idx = first
    # fits: [idx, idx + first) < CAPACITY
    assert host.send(bytes(first - RECORD_HEADER), timeout_s=0)
    assert host.send(b"x" * 40, timeout_s=0)  # 48 bytes do not fit in the last 16: wraps
    data = memoryview(host.mapping)[host.out_q + QUEUE_HEADER:]
    assert struct.unpack_from("<I", data, idx + first)[0] == WRAP
    assert struct.unpack_from("<I", data, 0)[0] == 40
    assert worker.receive(timeout_s=0) == bytes(first - RECORD_HEADER)
    assert worker.receive(timeout_s=0) == b"x" * 40


# -- full, empty, closed --------------------------------------------------------------------


def fill(channel, size=100):
    count = 0
    while channel.send(message(count, size), timeout_s=0):
        count += 1
    return count


def test_a_full_queue_refuses_a_send_with_timeout_zero(pair):
    host, worker = pair
    count = fill(host)
    assert count == CAPACITY // (8 + 104)
    assert not host.send(message(count, 100), timeout_s=0)
    assert not host.send(message(count, 100), timeout_s=0.01)
    assert worker.receive(timeout_s=0) == message(0, 100)
    assert host.send(message(count, 100), timeout_s=0)  # room again (after a wrap marker)
    for i in range(1, count + 1):
        assert worker.receive(timeout_s=0) == message(i, 100)


def test_a_blocked_producer_proceeds_when_the_consumer_drains(pair):
    host, worker = pair
    count = fill(host)
    late = message(count, 100)
    producer = Call(lambda: host.send(late, timeout_s=60))
    producer.start()
    wait_until_sleeping(host, host.out_q, PRODUCER_SLEEPING)
    for i in range(count):
        assert worker.receive(timeout_s=0) == message(i, 100)
    assert producer.finish() is True
    assert worker.receive(timeout_s=JOIN_S) == late


def test_a_blocked_consumer_wakes_for_a_message(pair):
    host, worker = pair
    consumer = Call(lambda: worker.receive(timeout_s=60))
    consumer.start()
    wait_until_sleeping(worker, worker.in_q, CONSUMER_SLEEPING)
    assert host.send(b"hello", timeout_s=0)
    assert consumer.finish() == b"hello"


def gap_of_last_message(channel):
    """The gap stamp (ns) of the last message queued for ``channel``."""
    return channel.mapping.load64(channel.in_q + GAP_NS)


def test_the_gap_stamp_counts_from_the_senders_last_send_or_receive(pair):
    host, worker = pair
    assert host.send(b"first")
    assert gap_of_last_message(worker) == NO_GAP, "a first message has no gap"
    time.sleep(0.02)
    assert host.send(b"after a pause")
    assert gap_of_last_message(worker) >= 0.02e9, "the gap counts from the previous send"
    assert worker.send(b"answer")
    time.sleep(0.02)
    receiving = time.monotonic_ns()
    assert host.receive(0) == b"answer"
    assert host.send(b"reply")
    assert gap_of_last_message(worker) <= time.monotonic_ns() - receiving, \
        "the gap counts from the sender's last receive, when that came later"


@pytest.mark.parametrize("sender_pauses_s, spins_next", [(0.0, True), (0.02, False)])
def test_a_receiver_spins_next_time_only_if_the_sender_answered_soon(pair, sender_pauses_s,
                                                                        spins_next):
    """The spin policy judges by how long the sender took once it had what it waited for (its
    gap stamp), never by how long the receiver waited: here the receiver sleeps for 20 ms, as
    it would if the sender's wake-up were slow, and still spins next time after a quick answer
    (the rule that counted the wait kept both sides asleep once a pause put them there)."""
    host, worker = pair
    assert worker.send(b"request")
    worker.spin_s = 0.0  # sleeps at once
    consumer = Call(lambda: worker.receive(timeout_s=60))
    consumer.start()
    wait_until_sleeping(worker, worker.in_q, CONSUMER_SLEEPING)
    time.sleep(0.02)
    assert host.receive(0) == b"request"
    time.sleep(sender_pauses_s)
    assert host.send(b"answer", timeout_s=0)
    assert consumer.finish() == b"answer"
    gap = gap_of_last_message(worker)
    if spins_next and gap >= 2 * SPIN_S * 1e9:
        pytest.skip("this machine took longer than the spin window between two Python lines")
    assert (gap >= 0.02e9) == (not spins_next)
    assert worker.spin_s == (SPIN_S if spins_next else 0.0)


@pytest.mark.parametrize("timeout_s", [0, 0.01])
def test_receive_returns_none_on_timeout(pair, timeout_s):
    _, worker = pair
    assert worker.receive(timeout_s=timeout_s) is None


def test_close_wakes_a_receiver_blocked_in_another_thread(pair):
    host, worker = pair
    consumer = Call(worker.receive)  # no timeout
    consumer.start()
    wait_until_sleeping(worker, worker.in_q, CONSUMER_SLEEPING)
    host.close()
    assert consumer.finish(timeout_s=2.0) is None
    assert worker.closed and host.closed


def test_close_wakes_a_sender_blocked_on_a_full_queue(pair):
    host, worker = pair
    fill(host)
    producer = Call(lambda: host.send(message(0, 100), timeout_s=-1))
    producer.start()
    wait_until_sleeping(host, host.out_q, PRODUCER_SLEEPING)
    worker.close()
    assert producer.finish(timeout_s=2.0) is False


def test_a_closed_queue_delivers_what_was_sent_then_none(pair):
    host, worker = pair
    assert host.send(b"one", timeout_s=0)
    assert host.send(b"two", timeout_s=0)
    host.close()
    host.close()  # twice is fine
    assert not host.send(b"three", timeout_s=0)
    assert worker.receive() == b"one"
    assert worker.receive() == b"two"
    assert worker.receive() is None


# -- across a process -----------------------------------------------------------------------


def _echo(channel):
    """Child: send every message back reversed until the channel closes."""
    while (data := channel.receive(timeout_s=JOIN_S)) is not None:
        if not channel.send(data[::-1], timeout_s=JOIN_S):
            return 2
    return 0 if channel.closed else 3


def test_ping_pong_with_a_forked_child_keeps_order_and_contents():
    host, worker = channel_pair()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            code = _echo(worker)
        finally:
            os._exit(code)
    try:
        for i in range(3000):
            size = (i * 37) % (MAX_MESSAGE + 1)
            sent = message(i, size)
            assert host.send(sent, timeout_s=JOIN_S)
            assert host.receive(timeout_s=JOIN_S) == sent[::-1], f"message {i}"
        # A few messages in flight at once as well.
        for i in range(0, 600, 4):
            batch = [message(i + k, (i * 11 + k * 97) % (MAX_MESSAGE + 1)) for k in range(4)]
            for sent in batch:
                assert host.send(sent, timeout_s=JOIN_S)
            for sent in batch:
                assert host.receive(timeout_s=JOIN_S) == sent[::-1]
    finally:
        host.close()
        status, ended = reap(pid, JOIN_S)
    assert ended and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# -- random sequences ---------------------------------------------------------------------


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.one_of(st.integers(0, MAX_MESSAGE), st.none()), max_size=120))
def test_random_sequences_of_sizes_arrive_in_order(steps):
    """Each step sends a message of that size (timeout 0) or, for None, receives one."""
    host, worker = channel_pair()
    queued = collections.deque()
    for i, size in enumerate(steps):
        if size is None:
            assert worker.receive(timeout_s=0) == (queued.popleft() if queued else None)
            continue
        sent = message(i, size)
        if host.send(sent, timeout_s=0):
            queued.append(sent)
        else:
            assert queued, "an empty queue refused a message that fits"
    while queued:
        assert worker.receive(timeout_s=0) == queued.popleft()
    assert worker.receive(timeout_s=0) is None


# -- corrupt queues -----------------------------------------------------------------------


def _at_end_of_file(setup, action):
    """In a child: a queue whose data area ends where its file ends (a read or write past it
    is a SIGBUS), with one message in it, corrupted by ``setup(mapping)``; then ``action``
    ("send" or "receive"). Returns "ProtocolError", "None", "message", "sent", "not sent", or
    how the child failed."""
    def attempt():
        mapping = memfd_mapping(2 * QUEUE_BYTES, file_size=QUEUE_BYTES)
        Channel.init_queue(mapping, 0, QUEUE_BYTES)
        channel = Channel(mapping, out_q=0, in_q=0)
        assert channel.send(b"abcdefgh" * 3, timeout_s=0)
        setup(mapping)
        try:
            if action == "send":
                return "sent" if channel.send(b"z", timeout_s=0) else "not sent"
            data = channel.receive(timeout_s=0)
        except ProtocolError:
            return "ProtocolError"
        return "None" if data is None else "message"

    outcome = run_in_child(attempt)
    return outcome[1] if outcome[0] == "returned" else outcome


def _store(offset, value, fmt="<Q"):
    return lambda m: struct.pack_into(fmt, memoryview(m), offset, value)


def _counters(head, tail):
    return lambda m: (_store(HEAD, head)(m), _store(TAIL, tail)(m))


RECORD = QUEUE_HEADER  # the first record's length word

CORRUPT_FOR_RECEIVE = [
    ("head past tail plus capacity", _counters(CAPACITY + 64, 0)),
    ("tail ahead of head", _counters(32, 64)),
    ("less than a record header", _counters(4, 0)),
    ("record length past head", _store(RECORD, 1000, "<I")),
    ("record length past the end", lambda m: (_counters(CAPACITY, CAPACITY - 16)(m),
                                              _store(RECORD + CAPACITY - 16, 64, "<I")(m))),
    ("huge record length", _store(RECORD, 0xFFFFFFF0, "<I")),
    ("wrap marker past head", _store(RECORD, WRAP, "<I")),
    ("bad magic", _store(MAGIC, 0)),
    ("capacity past the mapping", _store(CAPACITY_WORD, 1 << 40)),
    ("capacity not a multiple of 8", _store(CAPACITY_WORD, 1001)),
    ("zero capacity", _store(CAPACITY_WORD, 0)),
]


@pytest.mark.parametrize("setup", [c[1] for c in CORRUPT_FOR_RECEIVE],
                         ids=[c[0] for c in CORRUPT_FOR_RECEIVE])
def test_a_corrupt_queue_makes_receive_raise_protocol_error(setup):
    assert _at_end_of_file(setup, "receive") == "ProtocolError"


CORRUPT_FOR_SEND = [
    ("tail ahead of head", _counters(32, 64)),
    ("head past tail plus capacity", _counters(CAPACITY + 64, 0)),
    ("bad magic", _store(MAGIC, 0)),
    ("capacity past the mapping", _store(CAPACITY_WORD, 1 << 40)),
]


@pytest.mark.parametrize("setup", [c[1] for c in CORRUPT_FOR_SEND],
                         ids=[c[0] for c in CORRUPT_FOR_SEND])
def test_a_corrupt_queue_makes_send_raise_protocol_error(setup):
    assert _at_end_of_file(setup, "send") == "ProtocolError"


def test_a_misaligned_tail_makes_receive_raise_protocol_error():
    assert _at_end_of_file(_counters(CAPACITY - 1 + 8, CAPACITY - 1), "receive") == "ProtocolError"


def test_a_misaligned_head_makes_send_raise_protocol_error():
    assert _at_end_of_file(_counters(CAPACITY - 1, CAPACITY - 1), "send") == "ProtocolError"


@settings(max_examples=40, deadline=None, database=None)
@given(garbage=st.binary(min_size=1, max_size=64), where=st.sampled_from(["counters", "record"]))
def test_garbage_over_the_counters_or_a_record_never_crashes_receive(garbage, where):
    def setup(mapping):
        if where == "counters":
            # Both counters, 8-aligned (misaligned ones are tested above).
            head, tail = struct.unpack("<QQ", garbage.ljust(16, b"\0")[:16])
            _counters(head & ~7, tail & ~7)(mapping)
        else:
            data = memoryview(mapping)[RECORD:RECORD + len(garbage)]
            data[:] = garbage

    assert _at_end_of_file(setup, "receive") in ("ProtocolError", "message", "None")
