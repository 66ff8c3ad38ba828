/* stats.h: a model's call counters (stats.c). */
#ifndef OPE_STATS_H
#define OPE_STATS_H

#include "native.h"

/* A model's call counters, the bytes its calls copied into and out of the arena, and the
 * latencies of its last `window` served calls (ope/host/model.py). Each update runs whole under the
 * GIL, so threads sharing a model count every call without a lock of their own; on every
 * call, a Python lock around the counters cost more than the counting. call_alone() counts
 * the bytes of a lone call itself. */
typedef struct {
    PyObject_HEAD
    unsigned long long calls, errors, served, copied_in, copied_out;
    Py_ssize_t window;
    uint64_t *latencies_ns; /* served call k at k % window */
} CallStatsObject;

extern PyTypeObject CallStatsType;

#endif
