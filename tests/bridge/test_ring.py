"""Conformance suite for the data ring: every test runs against each implementation of the
layout in ope/bridge/ring.py (``Ring``, native; ``PyRing``, the Python reference).

Rings live in a memfd mapping (no /dev/shm), with guard bytes on both sides that every test
checks at teardown: whatever an allocator does, it must not write outside its ring. Anything
that may crash or hang on a corrupt ring runs in a forked child (tests/forked.py).
"""

import io
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from forked import memfd_mapping, run_in_child
import ope_native
from ope.bridge.ring import BLOCK_HEADER, LINE, RING_HEADER, PyRing, Ring, block_size

IMPLS = [Ring, PyRing]
L = ope_native.LAYOUT
FREE, USED = L["BLOCK_FREE"], L["BLOCK_USED"]

MAP_BYTES = 8192
OFFSET = 128  # where the ring starts in the mapping; the bytes before it are a guard
RING_BYTES = RING_HEADER + 32 * LINE  # a 2048-byte area: 16 blocks of one payload line
GUARD = 0xA5

HYPOTHESIS = settings(max_examples=40, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])


def new_ring(impl, mapping, offset=OFFSET, size=RING_BYTES):
    """A new empty ring of class ``impl``, laid out by that implementation."""
    return impl(mapping, offset, size)


def guarded_mapping():
    mapping = memfd_mapping(MAP_BYTES)
    memoryview(mapping)[:] = bytes([GUARD]) * MAP_BYTES
    return mapping


def assert_guards_intact(mapping, offset=OFFSET, size=RING_BYTES):
    raw = bytes(memoryview(mapping))
    assert raw[:offset] == bytes([GUARD]) * offset, "bytes before the ring were written"
    assert raw[offset + size:] == bytes([GUARD]) * (MAP_BYTES - offset - size), \
        "bytes after the ring were written"


@pytest.fixture(params=IMPLS, ids=lambda c: c.__name__)
def impl(request):
    return request.param


@pytest.fixture
def other(impl):
    """The other implementation, for interop tests."""
    return PyRing if impl is Ring else Ring


@pytest.fixture
def ring(impl):
    mapping = guarded_mapping()
    ring = new_ring(impl, mapping)
    yield ring
    assert_guards_intact(mapping)


def area_start(ring):
    return ring.offset + RING_HEADER


def first_payload(ring):
    return area_start(ring) + BLOCK_HEADER


def held_size(ring, payload):
    """The size a block really occupies (its header's size field)."""
    return ring.mapping.load64(payload - BLOCK_HEADER + L["B_SIZE"])


def write(ring, payload, data):
    memoryview(ring.mapping)[payload:payload + len(data)] = data


def read(ring, payload, n):
    return bytes(memoryview(ring.mapping)[payload:payload + n])


# -- allocation ---------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, 1, 63, 64, 65, 200, 1000])
def test_alloc_returns_aligned_payload_inside_the_area(ring, nbytes):
    payload = ring.alloc(nbytes)
    assert payload is not None
    assert payload % LINE == 0
    assert first_payload(ring) <= payload
    assert payload + nbytes <= area_start(ring) + ring.area
    assert ring.contains(payload, nbytes)
    assert held_size(ring, payload) == block_size(nbytes)


def test_area_is_the_ring_size_less_its_header_in_whole_lines(ring):
    assert ring.area == RING_BYTES - RING_HEADER
    assert ring.used == 0 and ring.high_water == 0


def test_the_whole_area_can_be_one_block(ring):
    assert ring.alloc(ring.area - BLOCK_HEADER + 1) is None
    payload = ring.alloc(ring.area - BLOCK_HEADER)
    assert payload == first_payload(ring)
    assert ring.used == ring.area
    assert ring.alloc(0) is None


def test_blocks_are_taken_in_order_as_the_cursor_moves(ring):
    payloads = [ring.alloc(100) for _ in range(4)]
    assert payloads == [first_payload(ring) + i * block_size(100) for i in range(4)]


def test_wrap_around_reuses_freed_space_at_the_start(ring):
    nbytes = 192  # 256-byte blocks: eight of them tile the area
    payloads = [ring.alloc(nbytes) for _ in range(7)]
    ring.release(payloads[0])
    ring.release(payloads[1])
    # 256 bytes are left at the end; 384 do not fit there, so the cursor wraps and the two
    # freed blocks at the start merge to hold it.
    wrapped = ring.alloc(300)
    assert wrapped == first_payload(ring)
    assert held_size(ring, wrapped) == block_size(300)
    # The end of the area is still free, and is found on the next pass.
    tail = ring.alloc(nbytes)
    assert tail is not None and tail != wrapped
    live = [wrapped, tail, *payloads[2:]]
    assert ring.used == sum(held_size(ring, p) for p in live)


def test_out_of_order_release_never_hands_out_a_held_block(ring):
    rng = random.Random(3)
    held = ring.alloc(200)
    pattern = bytes(rng.randrange(256) for _ in range(200))
    write(ring, held, pattern)
    held_extent = (held - BLOCK_HEADER, held - BLOCK_HEADER + held_size(ring, held))
    live = []
    for _ in range(200):  # many passes of the cursor over the held block
        while len(live) < 5:
            nbytes = rng.randrange(0, 300)
            payload = ring.alloc(nbytes)
            if payload is None:
                break
            start, end = payload - BLOCK_HEADER, payload - BLOCK_HEADER + held_size(ring, payload)
            assert end <= held_extent[0] or start >= held_extent[1], "held block handed out"
            write(ring, payload, b"\xee" * nbytes)
            live.append(payload)
        rng.shuffle(live)
        for payload in live[:rng.randrange(1, len(live) + 1)]:
            ring.release(payload)
            live.remove(payload)
    assert read(ring, held, 200) == pattern
    for payload in live:
        ring.release(payload)
    ring.release(held)
    assert ring.used == 0


def test_full_ring_returns_none_and_a_release_makes_room(ring):
    payloads = []
    while (payload := ring.alloc(1)) is not None:
        payloads.append(payload)
    assert len(payloads) == ring.area // block_size(1)
    assert ring.used == ring.area
    assert ring.alloc(0) is None
    ring.release(payloads[5])
    assert ring.alloc(1) == payloads[5]
    assert ring.alloc(1) is None


def test_free_neighbours_merge_for_a_large_allocation(ring):
    small = [ring.alloc(1) for _ in range(ring.area // block_size(1))]
    assert ring.alloc(1) is None
    for payload in reversed(small):  # released in reverse order, merged in one pass
        ring.release(payload)
    assert ring.used == 0
    big = ring.alloc(ring.area - BLOCK_HEADER)
    assert big == first_payload(ring)


def test_merge_stops_at_a_block_in_use(ring):
    small = [ring.alloc(1) for _ in range(ring.area // block_size(1))]
    for payload in small[:4] + small[5:]:
        ring.release(payload)
    # The largest free run is after the held block: 11 blocks of 128 bytes.
    assert ring.alloc(11 * 128 - BLOCK_HEADER + 1) is None
    assert ring.alloc(11 * 128 - BLOCK_HEADER) == small[5]


def test_a_failed_alloc_leaves_the_ring_consistent(ring):
    ring.alloc(960)  # [0, 1024) of the area
    ring.release(ring.alloc(448))  # [1024, 1536) freed; the cursor stays at 1536
    assert ring.alloc(1472) is None  # merges [1024, 2048), which does not fit 1536 bytes
    small = []
    while (payload := ring.alloc(0)) is not None:
        small.append(payload)
        assert len(small) <= 8, "more blocks than the free space holds"
    assert len(set(small)) == len(small) == 8
    assert ring.used == ring.area


def test_used_and_high_water_accounting(ring):
    a = ring.alloc(100)
    b = ring.alloc(1000)
    assert ring.used == block_size(100) + block_size(1000)
    peak = ring.used
    ring.release(a)
    assert ring.used == block_size(1000)
    assert ring.high_water == peak
    c = ring.alloc(10)
    assert ring.used == block_size(1000) + block_size(10)
    assert ring.high_water == peak
    ring.release(b)
    ring.release(c)
    assert ring.used == 0
    assert ring.high_water == peak


def test_double_release_raises(ring):
    payload = ring.alloc(10)
    ring.release(payload)
    with pytest.raises(ValueError):
        ring.release(payload)
    assert ring.used == 0


@pytest.mark.parametrize("where", ["misaligned", "inside a payload", "ring header",
                                   "before the ring", "past the area", "free block"])
def test_release_of_an_offset_that_is_not_a_block_raises(ring, where):
    big = ring.alloc(500)
    other = {
        "misaligned": big + 8,
        "inside a payload": big + LINE,  # zeroed payload bytes, no USED state there
        "ring header": ring.offset,
        "before the ring": 0,
        "past the area": area_start(ring) + ring.area + BLOCK_HEADER,
        "free block": big - BLOCK_HEADER + held_size(ring, big) + BLOCK_HEADER,
    }[where]
    write(ring, big, bytes(500))
    used = ring.used
    with pytest.raises(ValueError):
        ring.release(other)
    assert ring.used == used
    ring.release(big)
    assert ring.used == 0


def test_contains_checks_alignment_and_bounds(ring):
    start = first_payload(ring)
    end = area_start(ring) + ring.area
    assert ring.contains(start, ring.area - BLOCK_HEADER)
    assert not ring.contains(start, ring.area - BLOCK_HEADER + 1)
    assert not ring.contains(start + 1, 0)
    assert not ring.contains(start - LINE, 0)
    assert not ring.contains(start, -1)
    assert not ring.contains(end + LINE, 0)


def test_a_ring_too_small_for_one_block_is_refused():
    mapping = memfd_mapping(MAP_BYTES)
    with pytest.raises(ValueError):
        Ring(mapping, 0, RING_HEADER + BLOCK_HEADER)


# -- the two implementations share one layout -----------------------------------------------


def test_blocks_allocated_by_one_implementation_are_released_by_the_other(ring, other):
    peer = other(ring.mapping, ring.offset)
    mine = [ring.alloc(n) for n in (10, 100, 1000)]
    theirs = [peer.alloc(n) for n in (20, 200)]
    assert len(set(mine + theirs)) == 5
    for payload in mine:
        peer.release(payload)
    for payload in theirs:
        ring.release(payload)
    assert ring.used == peer.used == 0
    with pytest.raises(ValueError):
        peer.release(mine[0])
    assert peer.alloc(ring.area - BLOCK_HEADER) is not None


def test_both_implementations_lay_out_the_same_bytes():
    mappings = [memfd_mapping(MAP_BYTES), memfd_mapping(MAP_BYTES)]
    rings = [new_ring(impl, m) for impl, m in zip(IMPLS, mappings)]
    for ring in rings:
        a = ring.alloc(100)
        ring.alloc(300)
        ring.release(a)
        ring.alloc(10)
    assert bytes(memoryview(mappings[0])) == bytes(memoryview(mappings[1]))


def test_pyring_lays_out_a_new_ring():
    native, reference = memfd_mapping(MAP_BYTES), memfd_mapping(MAP_BYTES)
    Ring(native, OFFSET, RING_BYTES)
    PyRing(reference, OFFSET, RING_BYTES)
    assert bytes(memoryview(native)) == bytes(memoryview(reference))


# -- Blocks -------------------------------------------------------------------------------


def test_a_block_returns_its_space_when_the_last_view_is_dropped(ring):
    payload = ring.alloc(256)
    block = ring.block(payload, 256)
    array = np.frombuffer(block, np.uint8)
    view = array[16:128]
    view_of_view = view.reshape(8, 14)[::2]
    memview = memoryview(block)
    del block, array
    array_copy = np.array(view_of_view)  # a copy holds nothing
    del view
    assert ring.used == block_size(256)
    memview.release()
    assert ring.used == block_size(256)
    del view_of_view
    assert ring.used == 0
    assert array_copy.shape == (4, 14)
    assert ring.alloc(256) is not None


def test_a_block_views_its_payload_bytes(ring):
    payload = ring.alloc(8)
    block = ring.block(payload, 8)
    array = np.frombuffer(block, np.uint8)
    array[:] = np.arange(8)
    assert read(ring, payload, 8) == bytes(range(8))
    assert block.offset == payload and block.nbytes == 8 and block.ring == ring.offset
    del array, block
    assert ring.used == 0


def test_a_sealed_block_refuses_writable_views(ring):
    block = ring.block(ring.alloc(8), 8)
    block.seal()
    assert block.sealed
    array = np.frombuffer(block, np.uint8)
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1
    assert memoryview(block).readonly
    with pytest.raises((BufferError, TypeError)):  # a writable buffer is refused
        io.BytesIO(bytes(8)).readinto(block)
    del array, block
    assert ring.used == 0


@pytest.mark.parametrize("shift", [1, -LINE, 10 ** 6])
def test_a_block_must_be_a_payload_of_its_ring(ring, shift):
    payload = ring.alloc(8)
    with pytest.raises(ValueError):
        ring.block(payload + shift, 8)
    with pytest.raises(ValueError):
        ring.block(payload, ring.area)
    ring.release(payload)


# -- random sequences against a model -----------------------------------------------------


class RingModel(RuleBasedStateMachine):
    """Random allocs and releases (by either implementation) against the set of live blocks."""

    impl = Ring
    live = Bundle("live")

    def __init__(self):
        super().__init__()
        self.mapping = guarded_mapping()
        self.ring = new_ring(self.impl, self.mapping)
        self.by = {Ring: Ring(self.mapping, OFFSET), PyRing: PyRing(self.mapping, OFFSET)}
        self.blocks = {}  # payload -> (nbytes, fill byte)
        self.freed = set()  # payloads given back at some point
        self.peak = 0

    def extents(self):
        return sorted((p - BLOCK_HEADER, p - BLOCK_HEADER + held_size(self.ring, p))
                      for p in self.blocks)

    def largest_gap(self):
        edge, gap = area_start(self.ring), 0
        for start, end in self.extents():
            gap, edge = max(gap, start - edge), end
        return max(gap, area_start(self.ring) + self.ring.area - edge)

    @rule(target=live, nbytes=st.integers(0, 700), fill=st.integers(0, 255))
    def alloc(self, nbytes, fill):
        fits = self.largest_gap() >= block_size(nbytes)
        payload = self.ring.alloc(nbytes)
        if not fits:
            assert payload is None, "a block although no free run fits"
            return multiple()
        assert payload is not None, "None although a free run fits"
        assert payload % LINE == 0 and self.ring.contains(payload, nbytes)
        assert payload not in self.blocks
        assert held_size(self.ring, payload) in (block_size(nbytes), block_size(nbytes) + LINE)
        write(self.ring, payload, bytes([fill]) * nbytes)
        self.blocks[payload] = (nbytes, fill)
        self.peak = max(self.peak, self.ring.used)
        return payload

    @rule(payload=consumes(live), by=st.sampled_from(IMPLS))
    def release(self, payload, by):
        nbytes, fill = self.blocks.pop(payload)
        assert read(self.ring, payload, nbytes) == bytes([fill]) * nbytes, "live bytes changed"
        self.by[by].release(payload)
        self.freed.add(payload)

    @rule(by=st.sampled_from(IMPLS), data=st.data())
    def release_a_block_no_longer_held(self, by, data):
        dead = sorted(self.freed - set(self.blocks))
        if not dead:
            return
        used = self.ring.used
        with pytest.raises(ValueError):
            self.by[by].release(data.draw(st.sampled_from(dead)))
        assert self.ring.used == used

    @invariant()
    def blocks_do_not_overlap_and_used_adds_up(self):
        extents = self.extents()
        for (_, end), (start, _) in zip(extents, extents[1:]):
            assert end <= start, "two live blocks overlap"
        assert self.ring.used == sum(end - start for start, end in extents)
        assert self.ring.high_water == self.peak

    def teardown(self):
        assert_guards_intact(self.mapping)


class NativeRingModel(RingModel):
    impl = Ring


class ReferenceRingModel(RingModel):
    impl = PyRing


_MACHINE = settings(max_examples=25, stateful_step_count=60, deadline=None, database=None)
TestNativeRingModel = NativeRingModel.TestCase
TestNativeRingModel.settings = _MACHINE
TestReferenceRingModel = ReferenceRingModel.TestCase
TestReferenceRingModel.settings = _MACHINE


# -- corrupt rings ------------------------------------------------------------------------


def alloc_outcome(impl, setup, nbytes, timeout_s=10.0):
    """What ``alloc(nbytes)`` does on a guarded ring after ``setup(mapping)`` wrote over it,
    run in a child: "in area", "full", a ValueError, or the way the child failed."""
    def attempt():
        mapping = guarded_mapping()
        ring = new_ring(impl, mapping)
        setup(mapping)
        try:
            payload = ring.alloc(nbytes)
        except ValueError:
            return "ValueError"
        assert_guards_intact(mapping)
        if payload is None:
            return "full"
        return "in area" if ring.contains(payload, nbytes) else f"outside: {payload}+{nbytes}"

    outcome = run_in_child(attempt, timeout_s)
    return outcome[1] if outcome[0] == "returned" else outcome


def put_block(mapping, pos, size, state):
    header = OFFSET + RING_HEADER + pos
    struct.pack_into("<Q", memoryview(mapping), header + L["B_SIZE"], size)
    struct.pack_into("<I", memoryview(mapping), header + L["B_STATE"], state)


def set_area(mapping, area):
    struct.pack_into("<Q", memoryview(mapping), OFFSET + L["R_AREA"], area)


def set_cursor(mapping, pos):
    struct.pack_into("<Q", memoryview(mapping), OFFSET + L["R_CURSOR"], pos)


AREA = RING_BYTES - RING_HEADER

# (id, setup, nbytes): each writes a plausible-looking but wrong layout over a fresh ring.
CORRUPT = [
    ("bad magic", lambda m: struct.pack_into("<Q", memoryview(m), OFFSET + L["R_MAGIC"], 0), 8),
    ("area past the mapping", lambda m: set_area(m, 1 << 40), 8),
    ("area not whole lines", lambda m: set_area(m, 100), 8),
    ("zero size at the cursor", lambda m: put_block(m, 0, 0, FREE), 8),
    ("size past the area", lambda m: put_block(m, 0, AREA + LINE, FREE), 8),
    ("size not whole lines", lambda m: put_block(m, 0, 65, FREE), 8),
    ("unknown state", lambda m: put_block(m, 0, AREA, 0x1234), 8),
    ("cursor out of the area", lambda m: set_cursor(m, 1 << 50), 8),
    ("misaligned cursor", lambda m: set_cursor(m, 3), 8),
    ("used block with a zero size after it",
     lambda m: (put_block(m, 0, LINE * 2, USED), put_block(m, LINE * 2, 0, USED)), 8),
]




@pytest.mark.parametrize("impl,setup,nbytes", [
    pytest.param(impl, setup, nbytes, id=f"{name}-{impl.__name__}")
    for name, setup, nbytes in CORRUPT for impl in IMPLS])
def test_a_corrupt_ring_makes_alloc_raise(impl, setup, nbytes):
    assert alloc_outcome(impl, setup, nbytes) in ("ValueError", "full", "in area")


def _free_then_zero_size(mapping):
    put_block(mapping, 0, LINE, FREE)
    put_block(mapping, LINE, 0, FREE)


def _free_then_oversized_at_the_end(mapping):
    for pos in range(0, AREA - 2 * LINE, LINE):
        put_block(mapping, pos, LINE, USED)
    put_block(mapping, AREA - 2 * LINE, LINE, FREE)
    put_block(mapping, AREA - LINE, 1 << 40, FREE)
    set_cursor(mapping, AREA - 2 * LINE)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__name__)
def test_a_zero_size_free_neighbour_makes_alloc_raise(impl):
    # A 2 KiB ring answers in microseconds; the timeout only bounds what the known hang costs.
    assert alloc_outcome(impl, _free_then_zero_size, 100, timeout_s=1.0) == "ValueError"


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__name__)
def test_an_oversized_free_neighbour_makes_alloc_raise(impl):
    assert alloc_outcome(impl, _free_then_oversized_at_the_end, 2 * LINE) == "ValueError"


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__name__)
@HYPOTHESIS
@given(garbage=st.binary(min_size=AREA, max_size=AREA), nbytes=st.integers(0, AREA))
def test_random_bytes_over_the_area_never_crash_alloc(impl, garbage, nbytes):
    def setup(mapping):
        memoryview(mapping)[OFFSET + RING_HEADER:OFFSET + RING_BYTES] = garbage

    assert alloc_outcome(impl, setup, nbytes) in ("ValueError", "full", "in area")
