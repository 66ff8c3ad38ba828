/* ring.c: the data ring, where tensors live in shared memory.
 *
 * Next-fit from a cursor over blocks that tile the area: calls come in a steady rhythm, so
 * blocks are taken in order and mostly come back in order, and the cursor finds free space
 * right where it is, with no system call. Data the other process wrote (sizes, states) is
 * validated before it is trusted; a violation raises ValueError, never a crash.
 */
#include "ring.h"

/* Checks that a ring header at `ring` is intact; returns the area size or 0 with an error. */
uint64_t ring_area(MappingObject *m, long long ring) {
    if (check_range(m, ring, RING_HEADER, LINE)) return 0;
    uint64_t area = *u64_at(m->base, ring + R_AREA);
    if (*u64_at(m->base, ring + R_MAGIC) != RING_MAGIC || area == 0 || area % LINE ||
        area > (uint64_t)(m->size - ring - RING_HEADER)) {
        PyErr_Format(PyExc_ValueError, "no intact ring header at offset %lld", ring);
        return 0;
    }
    return area;
}

PyObject *mapping_ring_init(MappingObject *self, PyObject *args) {
    long long ring, size;
    if (!PyArg_ParseTuple(args, "LL", &ring, &size) || check_range(self, ring, size, LINE)) return NULL;
    uint64_t area = (uint64_t)(size - RING_HEADER) / LINE * LINE;
    if (size < RING_HEADER + 2 * BLOCK_HEADER) {
        PyErr_SetString(PyExc_ValueError, "ring too small");
        return NULL;
    }
    char *h = self->base + ring;
    memset(h, 0, RING_HEADER);
    *u64_at(h, R_AREA) = area;
    char *first = h + RING_HEADER;
    *u64_at(first, B_SIZE) = area;
    *u32_at(first, B_STATE) = BLOCK_FREE;
    /* SYNC POINT with ring_area()'s magic check in a process that maps the ring later. */
    __atomic_store_n(u64_at(h, R_MAGIC), RING_MAGIC, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* Next-fit over blocks that tile the area: the ring's cursor moves forward allocating,
 * blocks return out of order by flipping their state to FREE, and the allocator merges free
 * neighbours as it passes them. Only the allocating process writes sizes and the cursor. */
long long ring_alloc(MappingObject *m, long long ring, uint64_t nbytes) {
    uint64_t area = ring_area(m, ring);
    if (!area) return -2;
    char *h = m->base + ring, *a = h + RING_HEADER;
    uint64_t need = BLOCK_HEADER + round_up(nbytes ? nbytes : 1, LINE);
    if (need > area) return -1;
    uint64_t pos = *u64_at(h, R_CURSOR), scanned = 0;
    if (pos >= area || pos % LINE) pos = 0;
    while (scanned < area + need) {
        uint64_t size = *u64_at(a + pos, B_SIZE);
        if (size == 0 || size % LINE || size > area - pos) {
            PyErr_Format(PyExc_ValueError, "ring block at %llu has a corrupt size %llu",
                         (unsigned long long)pos, (unsigned long long)size);
            return -2;
        }
        /* SYNC POINT with the release store of BLOCK_FREE in ring_release() (other process). */
        uint32_t state = __atomic_load_n(u32_at(a + pos, B_STATE), __ATOMIC_ACQUIRE);
        if (state == BLOCK_FREE) {
            while (size < need && pos + size < area &&
                   __atomic_load_n(u32_at(a + pos + size, B_STATE), __ATOMIC_ACQUIRE) == BLOCK_FREE) {
                uint64_t next = *u64_at(a + pos + size, B_SIZE);
                if (next == 0 || next % LINE || next > area - pos - size) {
                    PyErr_Format(PyExc_ValueError, "ring block at %llu has a corrupt size %llu",
                                 (unsigned long long)(pos + size), (unsigned long long)next);
                    return -2;
                }
                size += next;
            }
            *u64_at(a + pos, B_SIZE) = size;
            if (size >= need) {
                if (size - need >= 2 * BLOCK_HEADER) {
                    *u64_at(a + pos + need, B_SIZE) = size - need;
                    *u32_at(a + pos + need, B_STATE) = BLOCK_FREE;
                    *u64_at(a + pos, B_SIZE) = size = need;
                }
                /* SYNC POINT with the acquire load of state in ring_release()'s caller. */
                __atomic_store_n(u32_at(a + pos, B_STATE), BLOCK_USED, __ATOMIC_RELEASE);
                /* SYNC POINT with the subtraction in ring_release(), maybe another process. */
                uint64_t used = __atomic_add_fetch(u64_at(h, R_USED), size, __ATOMIC_ACQ_REL);
                if (used > *u64_at(h, R_HIGH)) *u64_at(h, R_HIGH) = used;
                *u64_at(h, R_ALLOCS) += 1;
                *u64_at(h, R_CURSOR) = (pos + size) % area;
                return ring + RING_HEADER + (long long)pos + BLOCK_HEADER;
            }
        } else if (state != BLOCK_USED) {
            PyErr_Format(PyExc_ValueError, "ring block at %llu has a corrupt state 0x%x",
                         (unsigned long long)pos, state);
            return -2;
        }
        scanned += size;
        pos = (pos + size) % area;
    }
    /* A merge on the way may have swallowed the header the cursor pointed at; offset 0 always
     * starts a block. */
    *u64_at(h, R_CURSOR) = 0;
    return -1;
}

/* Gives a block back; `payload` is the offset ring_alloc() returned. May run in either
 * process. Validates the offset so that a lying peer cannot direct the write outside the
 * ring; returns 0, or -1 with ValueError set. */
int ring_release(MappingObject *m, long long ring, long long payload) {
    uint64_t area = ring_area(m, ring);
    if (!area) return -1;
    long long start = ring + RING_HEADER;
    long long hdr = payload - BLOCK_HEADER;
    if (hdr < start || hdr >= start + (long long)area || (hdr - start) % LINE) {
        PyErr_Format(PyExc_ValueError, "offset %lld is not a block of the ring at %lld", payload, ring);
        return -1;
    }
    char *b = m->base + hdr;
    uint32_t expected = BLOCK_USED;
    /* SYNC POINT with the release store of BLOCK_USED in ring_alloc(); the CAS makes a second
     * release of the same block (a peer's bug) a detected error instead of double counting. */
    if (!__atomic_compare_exchange_n(u32_at(b, B_STATE), &expected, BLOCK_FREE, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        PyErr_Format(PyExc_ValueError, "ring block at offset %lld is not in use", payload);
        return -1;
    }
    uint64_t size = *u64_at(b, B_SIZE);
    /* SYNC POINT with the addition in ring_alloc() (maybe another process). */
    __atomic_sub_fetch(u64_at(m->base, ring + R_USED), size, __ATOMIC_ACQ_REL);
    return 0;
}

PyObject *mapping_ring_alloc(MappingObject *self, PyObject *args) {
    long long ring, nbytes;
    if (!PyArg_ParseTuple(args, "LL", &ring, &nbytes)) return NULL;
    if (nbytes < 0) {
        PyErr_SetString(PyExc_ValueError, "nbytes must be >= 0");
        return NULL;
    }
    long long off = ring_alloc(self, ring, (uint64_t)nbytes);
    if (off == -2) return NULL;
    return PyLong_FromLongLong(off);
}

PyObject *mapping_ring_release(MappingObject *self, PyObject *args) {
    long long ring, payload;
    if (!PyArg_ParseTuple(args, "LL", &ring, &payload) || ring_release(self, ring, payload)) return NULL;
    Py_RETURN_NONE;
}
