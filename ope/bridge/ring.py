"""The data ring: where tensors live in shared memory.

One process allocates from a ring (the host for rings that carry inputs, the worker for rings
that carry outputs); whoever holds a block gives it back, in any order, from either process.
The bet is that calls come in a steady rhythm: blocks are taken in order as the cursor moves
forward and mostly come back in order, so the cursor finds free space right where it is and a
steady tick loop reuses the same bytes with no system call. A block the caller keeps (an
output held for later, a ``model.empty`` buffer reused every tick) is simply stepped over.

Layout (little-endian; the ring starts 64-byte aligned in its segment)::

    ring header, 64 bytes
       0  u64 magic    "OPERING1"
       8  u64 area     size of the block area in bytes, a multiple of 64
      16  u64 cursor   where the next search starts, relative to the area     [allocator]
      24  u64 used     bytes in USED blocks, headers included                 [atomic add/sub]
      32  u64 high     high-water mark of ``used``                            [allocator]
      40  u64 allocs   number of allocations                                  [allocator]
    block area, ``area`` bytes from offset 64, tiled by blocks

    block: a 64-byte header, then the payload (64-byte aligned, rounded up to 64 bytes)
       0  u64 size     whole block, header included                           [allocator]
       8  u32 state    FREE 0x45455246 ("FREE") or USED 0x44455355 ("USED")

Allocation is next-fit from the cursor: a USED block is stepped over; a FREE block absorbs
the FREE blocks after it until the request fits, and the remainder is split off. A search
that finds no room leaves the cursor at 0, because a merge on its way may have absorbed the
block the cursor pointed at; every size is checked before it is trusted. The
allocator stores USED with release order; the holder gives a block back with a release
compare-and-swap USED -> FREE, which the allocator reads with acquire order, so the bytes a
holder last read or wrote are never handed out while still in use. Only the allocator writes
sizes, the cursor and split headers, and only into FREE blocks, which no other process
touches. ``used`` is the one word both processes modify (atomic add/sub).

Offsets returned and taken by this module are payload offsets within the segment's mapping.
A process that did not allocate a block treats its offset as untrusted: the native
``Mapping.block(offset, nbytes, ring, ...)`` checks it against the ring before any view
exists (:meth:`Ring.contains` states the same rule in Python).

Two implementations share this layout and one conformance suite (tests/test_ring.py):
:class:`Ring`, backed by ope_native and used by ope, and :class:`PyRing`, the readable
reference in Python. The values above are declared once, in ope_native (``LAYOUT``); this
module reads them from there.
"""

import struct

import ope_native

__all__ = ["Ring", "PyRing", "LINE", "RING_HEADER", "BLOCK_HEADER", "block_size"]

LINE = ope_native.LINE
RING_HEADER = ope_native.RING_HEADER
BLOCK_HEADER = ope_native.BLOCK_HEADER

_L = ope_native.LAYOUT
_MAGIC, _FREE, _USED = _L["RING_MAGIC"], _L["BLOCK_FREE"], _L["BLOCK_USED"]
_AREA, _CURSOR, _USED_BYTES, _HIGH, _ALLOCS = (
    _L["R_AREA"], _L["R_CURSOR"], _L["R_USED"], _L["R_HIGH"], _L["R_ALLOCS"])
_SIZE, _STATE = _L["B_SIZE"], _L["B_STATE"]  # in a block header


def block_size(nbytes):
    """Bytes a payload of ``nbytes`` occupies in a ring, header included."""
    return BLOCK_HEADER + max(-(-nbytes // LINE), 1) * LINE


class Ring:
    """A data ring at ``offset`` in ``mapping`` (an ope_native.Mapping)."""

    __slots__ = ("mapping", "offset", "area", "_start")

    def __init__(self, mapping, offset, size=None):
        """Attach to the ring at ``offset``; with ``size``, first lay out a new empty ring."""
        if size is not None:
            mapping.ring_init(offset, size)
        self.mapping = mapping
        self.offset = offset
        self.area = mapping.load64(offset + _AREA)
        self._start = offset + RING_HEADER

    def alloc(self, nbytes):
        """Payload offset of a new block of at least ``nbytes``, or None when it does not fit."""
        payload = self.mapping.ring_alloc(self.offset, nbytes)
        return payload if payload >= 0 else None

    def release(self, payload):
        """Give the block at ``payload`` back (ValueError if it is not a block in use)."""
        self.mapping.ring_release(self.offset, payload)

    def block(self, payload, nbytes):
        """A Block viewing the payload that gives the block back when it is deallocated."""
        return self.mapping.block(payload, nbytes, ring=self.offset)

    def contains(self, payload, nbytes):
        """Whether [payload, payload+nbytes) can be a payload of this ring (alignment, bounds)."""
        rel = payload - self._start - BLOCK_HEADER
        return rel >= 0 and rel % LINE == 0 and nbytes >= 0 and rel + BLOCK_HEADER + nbytes <= self.area

    @property
    def used(self):
        return self.mapping.load64(self.offset + _USED_BYTES)

    @property
    def high_water(self):
        return self.mapping.load64(self.offset + _HIGH)


class PyRing(Ring):
    """Reference implementation of the same layout in Python. Slow; for tests and reading."""

    __slots__ = ("_buf",)

    def __init__(self, mapping, offset, size=None):
        self._buf = memoryview(mapping)
        if size is not None:
            self._init(mapping, offset, size)
        super().__init__(mapping, offset)

    def _init(self, mapping, offset, size):
        area = (size - RING_HEADER) // LINE * LINE
        self._buf[offset:offset + RING_HEADER] = bytes(RING_HEADER)
        self._set_u64(offset + _AREA, area)
        self._set_u64(offset + RING_HEADER + _SIZE, area)
        mapping.store32(offset + RING_HEADER + _STATE, _FREE)
        mapping.store64(offset, _MAGIC)

    def _u64(self, off):
        return struct.unpack_from("<Q", self._buf, off)[0]

    def _set_u64(self, off, value):
        struct.pack_into("<Q", self._buf, off, value)

    def _size(self, pos):
        return self._u64(self._start + pos + _SIZE)

    def _set_size(self, pos, size):
        self._set_u64(self._start + pos + _SIZE, size)

    def _state(self, pos):
        return self.mapping.load32(self._start + pos + _STATE)

    def _set_state(self, pos, state):
        self.mapping.store32(self._start + pos + _STATE, state)

    def alloc(self, nbytes):
        need = block_size(nbytes)
        if need > self.area:
            return None
        pos = self.mapping.load64(self.offset + _CURSOR)
        if pos >= self.area or pos % LINE:
            pos = 0
        scanned = 0
        while scanned < self.area + need:
            size = self._checked_size(pos)
            state = self._state(pos)
            if state == _FREE:
                size = self._merge_free(pos, size, need)
                if size >= need:
                    return self._take(pos, size, need)
            elif state != _USED:
                raise ValueError(f"ring block at {pos} has a corrupt state {state:#x}")
            scanned += size
            pos = (pos + size) % self.area
        # A merge may have swallowed the header the cursor pointed at; 0 always starts a block.
        self._set_u64(self.offset + _CURSOR, 0)
        return None

    def _checked_size(self, pos):
        size = self._size(pos)
        if size == 0 or size % LINE or size > self.area - pos:
            raise ValueError(f"ring block at {pos} has a corrupt size {size}")
        return size

    def _merge_free(self, pos, size, need):
        while size < need and pos + size < self.area and self._state(pos + size) == _FREE:
            size += self._checked_size(pos + size)
        self._set_size(pos, size)
        return size

    def _take(self, pos, size, need):
        if size - need >= 2 * BLOCK_HEADER:
            self._set_size(pos + need, size - need)
            self._set_state(pos + need, _FREE)
            self._set_size(pos, need)
            size = need
        self._set_state(pos, _USED)
        used = self.mapping.add64(self.offset + _USED_BYTES, size)
        self._set_u64(self.offset + _HIGH, max(self._u64(self.offset + _HIGH), used))
        self._set_u64(self.offset + _ALLOCS, self._u64(self.offset + _ALLOCS) + 1)
        self._set_u64(self.offset + _CURSOR, (pos + size) % self.area)
        return self._start + pos + BLOCK_HEADER

    def release(self, payload):
        pos = payload - BLOCK_HEADER - self._start
        if pos < 0 or pos >= self.area or pos % LINE or self._state(pos) != _USED:
            raise ValueError(f"offset {payload} is not a block in use of the ring at {self.offset}")
        self._set_state(pos, _FREE)
        self.mapping.add64(self.offset + _USED_BYTES, -self._size(pos))
