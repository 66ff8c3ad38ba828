/* ring.h: the data ring allocator (layout: layout.h; described in ope/bridge/ring.py).
 *
 * One process allocates from a ring; whoever holds a block gives it back, in any order, from
 * either process.
 */
#ifndef OPE_RING_H
#define OPE_RING_H

#include "mapping.h"

/* The area size of the intact ring header at `ring`, or 0 with ValueError set. */
uint64_t ring_area(MappingObject *m, long long ring);
/* The payload offset of a new block of `nbytes`; -1 when full, -2 with an error set. */
long long ring_alloc(MappingObject *m, long long ring, uint64_t nbytes);
/* Gives the block at `payload` back: 0, or -1 with ValueError set. */
int ring_release(MappingObject *m, long long ring, long long payload);

/* Mapping methods */
PyObject *mapping_ring_init(MappingObject *self, PyObject *args);
PyObject *mapping_ring_alloc(MappingObject *self, PyObject *args);
PyObject *mapping_ring_release(MappingObject *self, PyObject *args);

#endif
