/* ope_native: what Python cannot do for ope's shared-memory bridge.
 *
 * - Mapping: an mmap of a shared-memory segment whose lifetime is reference counted, so a
 *   numpy array viewing it stays valid after its model is closed or its worker has died.
 * - Block: a window of a Mapping exported through the buffer protocol. A Block cut from a
 *   data ring gives its space back to the ring when the last view of it is dropped.
 * - The data ring allocator, the message queue and the tensor frames of every call, whose byte
 *   layouts are described once, in the docstrings of ope/ring.py, ope/channel.py and
 *   ope/protocol.py. This file implements those layouts; read the docstrings first.
 * - A call's tensors into the arena and into a frame, and a frame back into views on the
 *   arena, in one call each (encode_frame, decode_frame; views through numpy's C API), and
 *   the success path of ope/spec.py's checks (check_plain): per-call Python costs more than
 *   all the copying of a small call. For the same reason the host's lone call
 *   (call_alone: checks, exchange, checks) and the worker's loop (serve_calls) each cross
 *   into C once per call, and a model's call counters live here (CallStats).
 * - Atomic loads/stores and futex wait/wake on shared words, with waits that spin briefly and
 *   then block, the GIL released throughout.
 *
 * Every atomic operation names the operation in the other process it synchronises with.
 * Offsets coming from Python are bounds-checked against the mapping before any access; data
 * the other process wrote (sizes, states, lengths) is validated before it is trusted, and a
 * violation raises ValueError (the host turns it into ope.ProtocolError), never a crash.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <pthread.h>
#include <signal.h>
#include <linux/futex.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* ---- layout constants (see ope/ring.py and ope/channel.py) ---------------------------- */

#define LINE 64
#define RING_MAGIC 0x31474E495245504FULL /* "OPERING1" */
#define RING_HEADER LINE
#define R_MAGIC 0
#define R_AREA 8
#define R_CURSOR 16
#define R_USED 24
#define R_HIGH 32
#define R_ALLOCS 40
#define BLOCK_HEADER LINE
#define B_SIZE 0
#define B_STATE 8
#define BLOCK_FREE 0x45455246u /* "FREE" */
#define BLOCK_USED 0x44455355u /* "USED" */

#define QUEUE_MAGIC 0x3345555145504FULL /* "OPEQUE3" */
#define Q_MAGIC 0
#define Q_CAPACITY 8
#define Q_HEAD 64
#define Q_TAIL 128
#define Q_DATA_BELL 192
#define Q_CONSUMER_SLEEPING 196
#define Q_PRODUCER_CPU 200
#define Q_GAP_NS 208
#define Q_PUSHED_NS 216
#define Q_SPACE_BELL 256
#define Q_PRODUCER_SLEEPING 260
#define Q_CONSUMER_CPU 264
#define Q_POPPED_NS 272
#define Q_CLOSED 320
#define Q_DATA 384
#define RECORD_HEADER 8
#define RECORD_WRAP 0xFFFFFFFFu

static inline uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

static inline uint64_t *u64_at(char *base, uint64_t off) { return (uint64_t *)(base + off); }
static inline uint32_t *u32_at(char *base, uint64_t off) { return (uint32_t *)(base + off); }

static uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A new tuple of the `n` arguments, references it steals; NULL (having released the others)
 * if one of them is NULL or memory runs out. For the results of the per-call functions:
 * Py_BuildValue parses its format string on every call, which showed in profiles of a small
 * call on both sides. */
static PyObject *tuple_stealing(Py_ssize_t n, ...) {
    va_list items;
    PyObject *tuple = PyTuple_New(n);
    int failed = tuple == NULL;
    va_start(items, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = va_arg(items, PyObject *);
        if (!item || failed) {
            failed = 1;
            Py_XDECREF(item);
        } else {
            PyTuple_SET_ITEM(tuple, i, item);
        }
    }
    va_end(items);
    if (failed) Py_CLEAR(tuple); /* its items set so far go with it; the rest are released */
    return tuple;
}

/* ---- futex --------------------------------------------------------------------------- */

/* Shared (not PRIVATE) futex ops: the word lives in memory mapped by several processes. */
static int futex_wait(uint32_t *word, uint32_t expected, double timeout_s) {
    struct timespec ts, *tsp = NULL;
    if (timeout_s >= 0) {
        ts.tv_sec = (time_t)timeout_s;
        ts.tv_nsec = (long)((timeout_s - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
}

static void futex_wake(uint32_t *word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

/* Rings `bell` after the caller published a change. Pairs with wait_for_change(): the
 * seq_cst increment and the load of `sleeping` form a Dekker pair with the waiter's seq_cst
 * store of `sleeping` and its re-check of the watched word, so a waiter either sees the change
 * or is woken. */
static void ring_bell(uint32_t *bell, uint32_t *sleeping) {
    __atomic_add_fetch(bell, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(sleeping, __ATOMIC_SEQ_CST)) futex_wake(bell);
}

enum wait_result { WAIT_CHANGED = 1, WAIT_TIMEOUT = 0, WAIT_CLOSED = -1, WAIT_ERROR = -2 };

/* Waits until the u64 at `watch` differs from `expected`, `closed` becomes non-zero, or the
 * deadline passes. Spins for `spin_s` first (a futex round trip costs tens of microseconds on
 * a VM; spinning catches a quick answer), then sleeps on `bell`. While spinning, if the peer
 * last ran on this very CPU (`peer_cpu`), it cannot answer while we hold the CPU: yield it.
 * (Wake-ups place a woken process on the waker's CPU, and two processes that then never
 * sleep look cache-hot to the scheduler and stay together.) Called with the GIL released;
 * re-takes it only to deliver signals. Returns an enum wait_result. */
static int wait_for_change(uint64_t *watch, uint64_t expected, uint32_t *closed, uint32_t *bell,
                           uint32_t *sleeping, const uint32_t *peer_cpu, double spin_s,
                           double timeout_s) {
    double start = monotonic_now();
    double deadline = timeout_s < 0 ? -1.0 : start + timeout_s;
    double spin_until = start + spin_s;
    unsigned n = 0;
    for (;;) {
        /* SYNC POINT with the producer's release store of head/tail (queue) or state. */
        if (__atomic_load_n(watch, __ATOMIC_ACQUIRE) != expected) return WAIT_CHANGED;
        if (__atomic_load_n(closed, __ATOMIC_ACQUIRE)) return WAIT_CLOSED;
        CPU_RELAX();
        if ((++n & 7) == 0) {
            /* Relaxed: a hint about placement, not data. */
            if ((uint32_t)sched_getcpu() == __atomic_load_n(peer_cpu, __ATOMIC_RELAXED))
                sched_yield();
            else if ((n & 511) == 0)
                sched_yield(); /* a third process may be waiting for this CPU */
            if ((n & 63) == 0) {
                double now = monotonic_now();
                if (deadline >= 0 && now >= deadline) return WAIT_TIMEOUT;
                if (now >= spin_until) break;
            }
        }
    }
    for (;;) {
        /* SYNC POINT with ring_bell(): seq_cst store of sleeping, then re-check. */
        __atomic_store_n(sleeping, 1, __ATOMIC_SEQ_CST);
        uint32_t seen = __atomic_load_n(bell, __ATOMIC_SEQ_CST);
        int result = 2;
        if (__atomic_load_n(watch, __ATOMIC_SEQ_CST) != expected) result = WAIT_CHANGED;
        else if (__atomic_load_n(closed, __ATOMIC_SEQ_CST)) result = WAIT_CLOSED;
        double remaining = -1.0;
        if (result == 2 && deadline >= 0) {
            remaining = deadline - monotonic_now();
            if (remaining <= 0) result = WAIT_TIMEOUT;
        }
        if (result == 2 && futex_wait(bell, seen, remaining) != 0 && errno == EINTR) {
            __atomic_store_n(sleeping, 0, __ATOMIC_SEQ_CST);
            PyGILState_STATE g = PyGILState_Ensure();
            int failed = PyErr_CheckSignals();
            PyGILState_Release(g);
            if (failed) return WAIT_ERROR;
            continue;
        }
        __atomic_store_n(sleeping, 0, __ATOMIC_SEQ_CST);
        if (result != 2) return result;
    }
}

/* ---- Mapping ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    char *base;
    Py_ssize_t size;
    int private; /* copy-on-write: this process's writes never reach the segment */
    PyObject *weakrefs;
} MappingObject;

static PyTypeObject MappingType;
static PyTypeObject BlockType;

static int mapping_init(MappingObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "size", "populate", "private", NULL};
    int fd, populate = 0, private = 0;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "in|pp", kwlist, &fd, &size, &populate, &private))
        return -1;
    if (self->base) {
        PyErr_SetString(PyExc_RuntimeError, "Mapping already initialised");
        return -1;
    }
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "mapping size must be positive");
        return -1;
    }
    /* A private mapping is populated read-only and only then made writable: populating a
     * writable private mapping would copy every page at once, and the copies would no longer
     * see what the other process writes. Read faults share the segment's pages; only a page
     * this process writes gets a private copy. The fd may then be read-only. */
    int flags = (private ? MAP_PRIVATE : MAP_SHARED) | (populate ? MAP_POPULATE : 0);
    int prot = private ? PROT_READ : PROT_READ | PROT_WRITE;
    void *p = mmap(NULL, (size_t)size, prot, flags, fd, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (private && mprotect(p, (size_t)size, PROT_READ | PROT_WRITE)) {
        PyErr_SetFromErrno(PyExc_OSError);
        munmap(p, (size_t)size);
        return -1;
    }
    self->base = p;
    self->size = size;
    self->private = private;
    return 0;
}

static void mapping_dealloc(MappingObject *self) {
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    if (self->base) munmap(self->base, (size_t)self->size);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->base, self->size, 0, flags);
}

static PyBufferProcs mapping_as_buffer = {(getbufferproc)mapping_getbuffer, NULL};

/* Checks that [off, off+len) lies inside the mapping and `off` is aligned to `align`. */
static int check_range(MappingObject *m, long long off, long long len, int align) {
    if (off < 0 || len < 0 || off > m->size || len > m->size - off || (off % align) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "range [%lld, +%lld) (alignment %d) is outside the %zd-byte mapping", off, len,
                     align, m->size);
        return -1;
    }
    return 0;
}

static PyObject *mapping_load32(MappingObject *self, PyObject *arg) {
    long long off = PyLong_AsLongLong(arg);
    if ((off == -1 && PyErr_Occurred()) || check_range(self, off, 4, 4)) return NULL;
    /* SYNC POINT with a store32() in the other process. */
    return PyLong_FromUnsignedLong(__atomic_load_n(u32_at(self->base, off), __ATOMIC_ACQUIRE));
}

static PyObject *mapping_store32(MappingObject *self, PyObject *args) {
    long long off;
    unsigned long value;
    if (!PyArg_ParseTuple(args, "Lk", &off, &value) || check_range(self, off, 4, 4)) return NULL;
    /* SYNC POINT with a load32() in the other process. */
    __atomic_store_n(u32_at(self->base, off), (uint32_t)value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *mapping_load64(MappingObject *self, PyObject *arg) {
    long long off = PyLong_AsLongLong(arg);
    if ((off == -1 && PyErr_Occurred()) || check_range(self, off, 8, 8)) return NULL;
    /* SYNC POINT with a store64()/add64() in the other process. */
    return PyLong_FromUnsignedLongLong(__atomic_load_n(u64_at(self->base, off), __ATOMIC_ACQUIRE));
}

static PyObject *mapping_store64(MappingObject *self, PyObject *args) {
    long long off;
    unsigned long long value;
    if (!PyArg_ParseTuple(args, "LK", &off, &value) || check_range(self, off, 8, 8)) return NULL;
    /* SYNC POINT with a load64() in the other process. */
    __atomic_store_n(u64_at(self->base, off), (uint64_t)value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *mapping_add64(MappingObject *self, PyObject *args) {
    long long off, delta;
    if (!PyArg_ParseTuple(args, "LL", &off, &delta) || check_range(self, off, 8, 8)) return NULL;
    /* SYNC POINT with add64()/load64() of the same word in the other process. */
    uint64_t v = __atomic_add_fetch(u64_at(self->base, off), (uint64_t)delta, __ATOMIC_ACQ_REL);
    return PyLong_FromUnsignedLongLong(v);
}

static PyObject *mapping_wake32(MappingObject *self, PyObject *arg) {
    long long off = PyLong_AsLongLong(arg);
    if ((off == -1 && PyErr_Occurred()) || check_range(self, off, 4, 4)) return NULL;
    futex_wake(u32_at(self->base, off));
    Py_RETURN_NONE;
}

/* wait32(off, expected, timeout_s, spin_s=0) -> True if the word differs from `expected`
 * on return, False on timeout. */
static PyObject *mapping_wait32(MappingObject *self, PyObject *args) {
    long long off;
    unsigned long expected;
    double timeout_s, spin_s = 0;
    if (!PyArg_ParseTuple(args, "Lkd|d", &off, &expected, &timeout_s, &spin_s) ||
        check_range(self, off, 4, 4))
        return NULL;
    uint32_t *word = u32_at(self->base, off);
    int changed = 0, failed = 0;
    Py_BEGIN_ALLOW_THREADS
    double start = monotonic_now();
    double deadline = timeout_s < 0 ? -1 : start + timeout_s;
    for (;;) {
        /* SYNC POINT with store32() of the same word in the other process. */
        if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != (uint32_t)expected) { changed = 1; break; }
        double now = monotonic_now();
        if (now - start < spin_s) { CPU_RELAX(); continue; }
        double remaining = deadline < 0 ? -1 : deadline - now;
        if (deadline >= 0 && remaining <= 0) break;
        if (futex_wait(word, (uint32_t)expected, remaining) != 0 && errno == EINTR) {
            Py_BLOCK_THREADS
            failed = PyErr_CheckSignals();
            Py_UNBLOCK_THREADS
            if (failed) break;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed) return NULL;
    return PyBool_FromLong(changed);
}

/* ---- data ring (layout: ope/ring.py) ----------------------------------------------- */

/* Checks that a ring header at `ring` is intact; returns the area size or 0 with an error. */
static uint64_t ring_area(MappingObject *m, long long ring) {
    if (check_range(m, ring, RING_HEADER, LINE)) return 0;
    uint64_t area = *u64_at(m->base, ring + R_AREA);
    if (*u64_at(m->base, ring + R_MAGIC) != RING_MAGIC || area == 0 || area % LINE ||
        area > (uint64_t)(m->size - ring - RING_HEADER)) {
        PyErr_Format(PyExc_ValueError, "no intact ring header at offset %lld", ring);
        return 0;
    }
    return area;
}

static PyObject *mapping_ring_init(MappingObject *self, PyObject *args) {
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
static long long ring_alloc(MappingObject *m, long long ring, uint64_t nbytes) {
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
static int ring_release(MappingObject *m, long long ring, long long payload) {
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

static PyObject *mapping_ring_alloc(MappingObject *self, PyObject *args) {
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

static PyObject *mapping_ring_release(MappingObject *self, PyObject *args) {
    long long ring, payload;
    if (!PyArg_ParseTuple(args, "LL", &ring, &payload) || ring_release(self, ring, payload)) return NULL;
    Py_RETURN_NONE;
}

/* ---- message queue (layout: ope/channel.py) --------------------------------------------- */

typedef struct {
    char *hdr, *data;
    uint64_t capacity;
} Queue;

static int queue_open(MappingObject *m, long long q, Queue *out) {
    if (check_range(m, q, Q_DATA, LINE)) return -1;
    char *h = m->base + q;
    uint64_t cap = *u64_at(h, Q_CAPACITY);
    if (*u64_at(h, Q_MAGIC) != QUEUE_MAGIC || cap == 0 || cap % 8 ||
        cap > (uint64_t)(m->size - q - Q_DATA)) {
        PyErr_Format(PyExc_ValueError, "no intact queue header at offset %lld", q);
        return -1;
    }
    out->hdr = h;
    out->data = h + Q_DATA;
    out->capacity = cap;
    return 0;
}

static PyObject *mapping_queue_init(MappingObject *self, PyObject *args) {
    long long q, size;
    if (!PyArg_ParseTuple(args, "LL", &q, &size) || check_range(self, q, size, LINE)) return NULL;
    if (size < Q_DATA + 64) {
        PyErr_SetString(PyExc_ValueError, "queue too small");
        return NULL;
    }
    char *h = self->base + q;
    memset(h, 0, Q_DATA);
    *u32_at(h, Q_PRODUCER_CPU) = *u32_at(h, Q_CONSUMER_CPU) = UINT32_MAX; /* not known yet */
    *u64_at(h, Q_CAPACITY) = (uint64_t)(size - Q_DATA) / 8 * 8;
    /* SYNC POINT with queue_open()'s magic check in the process that attaches later. */
    __atomic_store_n(u64_at(h, Q_MAGIC), QUEUE_MAGIC, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* How long this side had left the channel alone before `now`: since its previous push on the
 * queue at `out`, or its last pop from the one at `in` (the queue it consumes; NULL if none),
 * whichever came later. UINT64_MAX when it has done neither. Both stamps are this side's own. */
static uint64_t channel_gap(char *out, char *in, uint64_t now) {
    /* Relaxed: this process's own stamps, which another of its threads may be writing (one
     * thread sends while another receives); a hint either way. */
    uint64_t last = __atomic_load_n(u64_at(out, Q_PUSHED_NS), __ATOMIC_RELAXED);
    uint64_t popped = in ? __atomic_load_n(u64_at(in, Q_POPPED_NS), __ATOMIC_RELAXED) : 0;
    if (popped > last) last = popped;
    return last && now >= last ? now - last : UINT64_MAX;
}

/* Queues `len` bytes at `buf`. `peer_q` is the queue this side consumes (-1 if none): with it,
 * the record's gap stamp (channel_gap(), for the consumer's spin policy) counts from this
 * side's last pop too. Returns 1 once queued, 0 if the queue is closed or stayed full until the
 * timeout, -1 with an exception set. Called with the GIL held; releases it to wait. */
static int queue_push_record(MappingObject *m, long long q, const char *buf, Py_ssize_t len,
                             double timeout_s, double spin_s, long long peer_q) {
    Queue Q;
    if (queue_open(m, q, &Q) || (peer_q >= 0 && check_range(m, peer_q, Q_DATA, LINE))) return -1;
    uint64_t rec = RECORD_HEADER + round_up((uint64_t)len, 8);
    if ((uint64_t)len >= RECORD_WRAP || rec > Q.capacity / 2) {
        PyErr_Format(PyExc_OverflowError, "message of %zd bytes exceeds the control queue (%llu bytes)",
                     len, (unsigned long long)Q.capacity);
        return -1;
    }
    uint64_t *head = u64_at(Q.hdr, Q_HEAD), *tail = u64_at(Q.hdr, Q_TAIL);
    uint64_t h = *head; /* only this process writes head */
    for (;;) {
        /* SYNC POINT with the consumer's release store of tail in queue_pop_record(). */
        uint64_t t = __atomic_load_n(tail, __ATOMIC_ACQUIRE);
        uint64_t idx = h % Q.capacity, pad = idx + rec > Q.capacity ? Q.capacity - idx : 0;
        if (__atomic_load_n(u32_at(Q.hdr, Q_CLOSED), __ATOMIC_ACQUIRE)) return 0;
        if (h - t > Q.capacity || h % 8 || t % 8) {
            PyErr_SetString(PyExc_ValueError, "queue head/tail out of range: corrupt queue");
            return -1;
        }
        if (Q.capacity - (h - t) >= pad + rec) {
            if (pad) {
                *u32_at(Q.data, idx) = RECORD_WRAP;
                h += pad;
                idx = 0;
            }
            *u32_at(Q.data, idx) = (uint32_t)len;
            memcpy(Q.data + idx + RECORD_HEADER, buf, (size_t)len);
            /* Relaxed: where we run, a hint for the consumer's spin (wait_for_change). */
            __atomic_store_n(u32_at(Q.hdr, Q_PRODUCER_CPU), (uint32_t)sched_getcpu(), __ATOMIC_RELAXED);
            uint64_t now = monotonic_ns();
            /* Relaxed: a hint for the consumer's spin policy (queue_pop_record), not data. */
            __atomic_store_n(u64_at(Q.hdr, Q_GAP_NS),
                             channel_gap(Q.hdr, peer_q >= 0 ? m->base + peer_q : NULL, now),
                             __ATOMIC_RELAXED);
            __atomic_store_n(u64_at(Q.hdr, Q_PUSHED_NS), now, __ATOMIC_RELAXED); /* see channel_gap() */
            /* SYNC POINT with the acquire load of head in queue_pop_record()/wait_for_change(). */
            __atomic_store_n(head, h + rec, __ATOMIC_RELEASE);
            ring_bell(u32_at(Q.hdr, Q_DATA_BELL), u32_at(Q.hdr, Q_CONSUMER_SLEEPING));
            return 1;
        }
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = wait_for_change(tail, t, u32_at(Q.hdr, Q_CLOSED), u32_at(Q.hdr, Q_SPACE_BELL),
                                 u32_at(Q.hdr, Q_PRODUCER_SLEEPING), u32_at(Q.hdr, Q_CONSUMER_CPU),
                                 spin_s, timeout_s);
        Py_END_ALLOW_THREADS
        if (status == WAIT_ERROR) return -1;
        if (status != WAIT_CHANGED) return 0;
    }
}

/* push(q, data, timeout_s, spin_s, peer_q=-1) -> True once queued, False if the queue is closed
 * or stayed full until the timeout. `peer_q`: the queue this side consumes (queue_push_record). */
static PyObject *mapping_queue_push(MappingObject *self, PyObject *args) {
    long long q, peer_q = -1;
    Py_buffer msg;
    double timeout_s, spin_s;
    if (!PyArg_ParseTuple(args, "Ly*dd|L", &q, &msg, &timeout_s, &spin_s, &peer_q)) return NULL;
    int status = queue_push_record(self, q, msg.buf, msg.len, timeout_s, spin_s, peer_q);
    PyBuffer_Release(&msg);
    return status < 0 ? NULL : PyBool_FromLong(status);
}

/* How long a waiter spins before it sleeps. A wake-up costs ~40 us on this kind of VM, so with a
 * spin shorter than a round trip that includes one wake-up, both sides fall into sleeping on
 * every message (measured: 50 us spin -> 75-120 us per queue round trip, 200 us -> 3 us). Long
 * enough for that; short enough that a host waiting on a long call wastes little CPU. */
#define SPIN_S 200e-6

/* The next record, as new bytes; None (a new reference) if nothing came before the timeout or
 * the queue was closed with nothing left in it; NULL with an exception set. `*spin_s` is the
 * spin for this wait and becomes the one for the next: SPIN_S only if the producer had left the
 * channel alone for less than twice the spin window before it sent this message (its gap stamp,
 * channel_gap()), i.e. it answers quickly once it has what it waits for. When it takes longer
 * (a model computing for milliseconds, a host between ticks), spinning only burns a CPU that
 * computing workers need. The rule counts no wake-up, of either side: on a VM a wake-up can
 * take hundreds of microseconds, and a rule that counts the time from the start of the wait
 * sees the other side's wake-up as a slow answer, so once both sides slept they judged each
 * other slow and slept again (tests/test_channel.py shows the case). Under that rule a
 * 50,000-call loop had runs of thousands of calls at ~300-700 us; how much of that was the
 * rule and how much the hypervisor, the runs measured after the change could not tell.
 * Called with the GIL held; releases it to wait. */
static PyObject *queue_pop_record(MappingObject *m, long long q, double timeout_s, double *spin_s) {
    Queue Q;
    if (queue_open(m, q, &Q)) return NULL;
    uint64_t *head = u64_at(Q.hdr, Q_HEAD), *tail = u64_at(Q.hdr, Q_TAIL);
    uint64_t t = *tail; /* only this process writes tail */
    for (;;) {
        /* SYNC POINT with the producer's release store of head in queue_push_record(). */
        uint64_t h = __atomic_load_n(head, __ATOMIC_ACQUIRE);
        if (h == t) {
            int status;
            Py_BEGIN_ALLOW_THREADS
            status = wait_for_change(head, t, u32_at(Q.hdr, Q_CLOSED), u32_at(Q.hdr, Q_DATA_BELL),
                                     u32_at(Q.hdr, Q_CONSUMER_SLEEPING),
                                     u32_at(Q.hdr, Q_PRODUCER_CPU), *spin_s, timeout_s);
            Py_END_ALLOW_THREADS
            if (status == WAIT_ERROR) return NULL;
            if (status != WAIT_CHANGED) Py_RETURN_NONE;
            continue;
        }
        uint64_t avail = h - t, idx = t % Q.capacity;
        if (avail > Q.capacity || avail < RECORD_HEADER || h % 8 || t % 8) {
            PyErr_SetString(PyExc_ValueError, "queue head/tail out of range: corrupt queue");
            return NULL;
        }
        uint32_t len = *u32_at(Q.data, idx);
        if (len == RECORD_WRAP) {
            uint64_t skip = Q.capacity - idx;
            if (skip > avail) {
                PyErr_SetString(PyExc_ValueError, "queue wrap marker past head: corrupt queue");
                return NULL;
            }
            t += skip;
            continue;
        }
        uint64_t rec = RECORD_HEADER + round_up(len, 8);
        if (rec > avail || idx + rec > Q.capacity) {
            PyErr_Format(PyExc_ValueError, "queue record of %u bytes overruns the queue: corrupt queue", len);
            return NULL;
        }
        PyObject *out = PyBytes_FromStringAndSize(Q.data + idx + RECORD_HEADER, len);
        if (!out) return NULL;
        /* Relaxed: where we run, a hint for the producer's spin (wait_for_change). */
        __atomic_store_n(u32_at(Q.hdr, Q_CONSUMER_CPU), (uint32_t)sched_getcpu(), __ATOMIC_RELAXED);
        /* SYNC POINT with the acquire load of tail in queue_push_record(). */
        __atomic_store_n(tail, t + rec, __ATOMIC_RELEASE);
        ring_bell(u32_at(Q.hdr, Q_SPACE_BELL), u32_at(Q.hdr, Q_PRODUCER_SLEEPING));
        __atomic_store_n(u64_at(Q.hdr, Q_POPPED_NS), monotonic_ns(), __ATOMIC_RELAXED); /* channel_gap() */
        /* Relaxed: the producer's gap stamp is a hint, written before its release of head. */
        *spin_s = __atomic_load_n(u64_at(Q.hdr, Q_GAP_NS), __ATOMIC_RELAXED) < 2 * SPIN_S * 1e9
                      ? SPIN_S : 0.0;
        return out;
    }
}

/* pop(q, timeout_s, spin_s) -> (data, spin_s for the next pop): data is bytes, or None if
 * nothing came before the timeout or the queue was closed with nothing left in it. */
static PyObject *mapping_queue_pop(MappingObject *self, PyObject *args) {
    long long q;
    double timeout_s, spin_s;
    if (!PyArg_ParseTuple(args, "Ldd", &q, &timeout_s, &spin_s)) return NULL;
    PyObject *data = queue_pop_record(self, q, timeout_s, &spin_s);
    return data ? Py_BuildValue("(Nd)", data, spin_s) : NULL;
}

/* close(q): marks the queue closed and wakes both ends, whichever process calls it. */
/* Closing touches only the header's own words, so it works on a queue whose header the peer
 * wrote garbage into: closing is how a waiter on it is woken. */
static PyObject *mapping_queue_close(MappingObject *self, PyObject *arg) {
    long long q = PyLong_AsLongLong(arg);
    if ((q == -1 && PyErr_Occurred()) || check_range(self, q, Q_DATA, LINE)) return NULL;
    char *hdr = self->base + q;
    /* SYNC POINT with the acquire loads of closed in wait_for_change() and queue_push_record(). */
    __atomic_store_n(u32_at(hdr, Q_CLOSED), 1, __ATOMIC_SEQ_CST);
    ring_bell(u32_at(hdr, Q_DATA_BELL), u32_at(hdr, Q_CONSUMER_SLEEPING));
    ring_bell(u32_at(hdr, Q_SPACE_BELL), u32_at(hdr, Q_PRODUCER_SLEEPING));
    Py_RETURN_NONE;
}

/* ---- tensor frames (layout: ope/protocol.py) --------------------------------------------- */

#define FRAME_MARKER 0xC1 /* a byte msgpack never uses */
#define MSG_INFER 4     /* message types, as in ope/protocol.py */
#define MSG_RESULT 6
#define FRAME_HEADER 24
#define ENTRY_HEADER 32
#define FRAME_MAX_DIMS 32
#define STRING_CODE 12
/* Bytes per element of each dtype code, in the order of ope.spec.DTYPES; 0 for strings,
 * whose itemsize is 4 bytes (one UCS-4 code point) times their width. */
static const uint32_t CODE_ITEMSIZE[] = {1, 1, 2, 4, 8, 1, 2, 4, 8, 2, 4, 8, 0};
#define N_CODES (sizeof CODE_ITEMSIZE / sizeof CODE_ITEMSIZE[0])

static inline void put_u16(char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put_u32(char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_u64(char *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get_u16(const char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t get_u32(const char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get_u64(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int itemsize_fits_code(uint64_t code, uint64_t itemsize) {
    if (code >= N_CODES) return 0;
    return code == STRING_CODE ? itemsize % 4 == 0 : itemsize == CODE_ITEMSIZE[code];
}

static int frame_error(const char *what, Py_ssize_t at) {
    PyErr_Format(PyExc_ValueError, "tensor frame: %s (at byte %zd)", what, at);
    return -1;
}

/* One entry's fields: what pack_frame() reads from Python, encode_frame() from an array,
 * and parse_entry() from a frame. */
typedef struct {
    const char *name;
    Py_ssize_t name_len;
    unsigned long long code, itemsize, seg, offset, nbytes;
    Py_ssize_t ndim;
    unsigned long long dims[FRAME_MAX_DIMS];
} Entry;

static int entry_in_range(const Entry *e) {
    if (e->ndim > FRAME_MAX_DIMS || e->name_len < 1 || e->name_len > UINT16_MAX ||
        !itemsize_fits_code(e->code, e->itemsize) || e->itemsize > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "tensor entry out of the frame's ranges");
        return -1;
    }
    return 0;
}

static int read_entry(PyObject *t, Entry *e) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 7) {
        PyErr_SetString(PyExc_TypeError, "a tensor entry is a 7-tuple");
        return -1;
    }
    e->name = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(t, 0), &e->name_len);
    if (!e->name) return -1;
    unsigned long long *fields[] = {&e->code, &e->itemsize, NULL, &e->seg, &e->offset, &e->nbytes};
    for (int i = 0; i < 6; i++) {
        if (!fields[i]) continue;
        *fields[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, i + 1));
        if (*fields[i] == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    PyObject *shape = PyTuple_GET_ITEM(t, 3);
    if (!PyTuple_Check(shape)) {
        PyErr_SetString(PyExc_TypeError, "a tensor entry's shape is a tuple");
        return -1;
    }
    e->ndim = PyTuple_GET_SIZE(shape);
    if (entry_in_range(e)) return -1;
    for (Py_ssize_t d = 0; d < e->ndim; d++) {
        e->dims[d] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(shape, d));
        if (e->dims[d] == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

/* The frame of `count` entries, as bytes. */
static PyObject *write_frame(int kind, unsigned long long call_id, unsigned long long copied,
                             const Entry *e, Py_ssize_t count) {
    Py_ssize_t size = FRAME_HEADER;
    for (Py_ssize_t i = 0; i < count; i++)
        size += ENTRY_HEADER + 8 * e[i].ndim + (Py_ssize_t)round_up((uint64_t)e[i].name_len, 8);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    memset(p, 0, (size_t)size);
    p[0] = (char)FRAME_MARKER;
    p[1] = (char)kind;
    put_u16(p + 2, (uint16_t)count);
    put_u64(p + 8, call_id);
    put_u64(p + 16, copied);
    p += FRAME_HEADER;
    for (Py_ssize_t i = 0; i < count; i++) {
        p[0] = (char)e[i].code;
        p[1] = (char)e[i].ndim;
        put_u16(p + 2, (uint16_t)e[i].name_len);
        put_u32(p + 4, (uint32_t)e[i].itemsize);
        put_u64(p + 8, e[i].seg);
        put_u64(p + 16, e[i].offset);
        put_u64(p + 24, e[i].nbytes);
        p += ENTRY_HEADER;
        for (Py_ssize_t d = 0; d < e[i].ndim; d++, p += 8) put_u64(p, e[i].dims[d]);
        memcpy(p, e[i].name, (size_t)e[i].name_len);
        p += round_up((uint64_t)e[i].name_len, 8);
    }
    return out;
}

static int check_frame_size(int kind, Py_ssize_t count) {
    if (kind < 0 || kind > 255 || count > UINT16_MAX) {
        PyErr_SetString(PyExc_ValueError, "frame kind or tensor count out of range");
        return -1;
    }
    return 0;
}

/* pack_frame(kind, call_id, copied, entries) -> bytes. Each entry is
 * (name, dtype code, itemsize, shape tuple, segment id, payload offset, nbytes). */
static PyObject *pack_frame(PyObject *m, PyObject *args) {
    int kind;
    unsigned long long call_id, copied;
    PyObject *entries;
    if (!PyArg_ParseTuple(args, "iKKO!", &kind, &call_id, &copied, &PyList_Type, &entries)) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(entries);
    if (check_frame_size(kind, count)) return NULL;
    Entry stack[4], *e = count <= 4 ? stack : PyMem_Malloc(sizeof(Entry) * (size_t)count);
    if (!e) return PyErr_NoMemory();
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < count; i++)
        if (read_entry(PyList_GET_ITEM(entries, i), &e[i])) goto done;
    out = write_frame(kind, call_id, copied, e, count);
done:
    if (e != stack) PyMem_Free(e);
    return out;
}

/* Reads and checks one entry at `base + *pos` (bounds: [base, base+len)); advances *pos.
 * Everything the peer wrote is checked here, except that the range names live memory: that
 * is new_block()'s check against the ring. The name still has to pass entry_name(). */
static int parse_entry(const char *base, Py_ssize_t *pos, Py_ssize_t len, Entry *e) {
    const char *p = base + *pos;
    if (len - *pos < ENTRY_HEADER) return frame_error("entry header past the end", *pos);
    e->code = (uint8_t)p[0];
    e->ndim = (uint8_t)p[1];
    e->name_len = get_u16(p + 2);
    e->itemsize = get_u32(p + 4);
    e->seg = get_u64(p + 8);
    e->offset = get_u64(p + 16);
    e->nbytes = get_u64(p + 24);
    uint64_t need = ENTRY_HEADER + 8 * (uint64_t)e->ndim + round_up((uint64_t)e->name_len, 8);
    if (e->ndim > FRAME_MAX_DIMS || e->name_len == 0) return frame_error("bad rank or empty name", *pos);
    if ((uint64_t)(len - *pos) < need) return frame_error("entry past the end", *pos);
    if (!itemsize_fits_code(e->code, e->itemsize)) return frame_error("dtype code and itemsize disagree", *pos);
    if (e->offset > (uint64_t)LLONG_MAX || e->seg > (uint64_t)LLONG_MAX)
        return frame_error("segment id or offset out of range", *pos);
    /* numpy refuses a shape whose non-zero dims multiply past its index range even when
     * another dim is 0, so the product of the non-zero dims (times the itemsize) must fit. */
    uint64_t elements = 1, extent = 1, total, extent_bytes;
    int overflow = 0;
    for (Py_ssize_t d = 0; d < e->ndim; d++) {
        uint64_t dim = get_u64(p + ENTRY_HEADER + 8 * d);
        overflow |= dim > (uint64_t)LLONG_MAX || (dim && __builtin_mul_overflow(extent, dim, &extent));
        elements *= dim; /* <= extent, or 0 */
        e->dims[d] = dim;
    }
    if (overflow || __builtin_mul_overflow(extent, e->itemsize ? e->itemsize : 1, &extent_bytes) ||
        extent_bytes > (uint64_t)LLONG_MAX || __builtin_mul_overflow(elements, e->itemsize, &total) ||
        total != e->nbytes)
        return frame_error("nbytes does not match shape and itemsize", *pos);
    e->name = p + ENTRY_HEADER + 8 * e->ndim;
    *pos += (Py_ssize_t)need;
    return 0;
}

static PyObject *entry_name(const Entry *e, Py_ssize_t at) {
    PyObject *name = PyUnicode_DecodeUTF8(e->name, e->name_len, "strict");
    if (!name) {
        PyErr_Clear();
        frame_error("tensor name is not UTF-8", at);
    }
    return name;
}

static PyObject *entry_shape(const Entry *e) {
    PyObject *shape = PyTuple_New(e->ndim);
    for (Py_ssize_t d = 0; shape && d < e->ndim; d++) {
        PyObject *v = PyLong_FromUnsignedLongLong(e->dims[d]);
        if (!v) Py_CLEAR(shape);
        else PyTuple_SET_ITEM(shape, d, v);
    }
    return shape;
}

/* One entry as the tuple pack_frame() takes. */
static PyObject *unpack_entry(const char *base, Py_ssize_t *pos, Py_ssize_t len) {
    Entry e;
    Py_ssize_t at = *pos;
    if (parse_entry(base, pos, len, &e)) return NULL;
    PyObject *name = entry_name(&e, at), *shape = name ? entry_shape(&e) : NULL;
    if (!shape) {
        Py_XDECREF(name);
        return NULL;
    }
    return Py_BuildValue("(NKKNKKK)", name, e.code, e.itemsize, shape, e.seg, e.offset, e.nbytes);
}

/* The header of a frame of `len` bytes, checked; returns its entry count, or -1. */
static Py_ssize_t frame_count(const char *p, Py_ssize_t len) {
    if (len < FRAME_HEADER || (uint8_t)p[0] != FRAME_MARKER || get_u32(p + 4) != 0)
        return frame_error("no frame header", 0);
    return get_u16(p + 2);
}

/* unpack_frame(data) -> (kind, call_id, copied, [entry, ...]); ValueError for anything that
 * is not a well-formed frame. */
static PyObject *unpack_frame(PyObject *m, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const char *p = view.buf;
    Py_ssize_t len = view.len, pos = FRAME_HEADER, count = frame_count(p, len);
    PyObject *entries = NULL, *result = NULL;
    if (count < 0) goto done;
    entries = PyList_New(count);
    if (!entries) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *entry = unpack_entry(p, &pos, len);
        if (!entry) goto done;
        PyList_SET_ITEM(entries, i, entry);
    }
    if (pos != len) {
        frame_error("bytes after the last entry", pos);
        goto done;
    }
    result = Py_BuildValue("(iKKO)", (int)(uint8_t)p[1], (unsigned long long)get_u64(p + 8),
                           (unsigned long long)get_u64(p + 16), entries);
done:
    Py_XDECREF(entries);
    PyBuffer_Release(&view);
    return result;
}

/* ---- Block --------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    MappingObject *mapping;
    Py_ssize_t offset, nbytes;
    long long ring; /* ring header offset, or -1: the block is not returned to a ring */
    int sealed;
    PyObject *weakrefs;
} BlockObject;

/* A Block viewing [off, off+nbytes) of `m`. With a ring (>= 0), the range must be a payload
 * of that ring, and if `release` the block is given back to the ring when the Block is
 * deallocated. */
static PyObject *new_block(MappingObject *m, long long off, long long nbytes, long long ring,
                           int release, int sealed) {
    if (check_range(m, off, nbytes, 1)) return NULL;
    if (ring >= 0) {
        /* The range must lie in the ring's area; a block that will be given back must also
         * start where ring_alloc() could have put a payload, so that releasing it touches that
         * ring's block header and nothing else. A view that is not released may start inside
         * a block (a slice of an arena array). */
        uint64_t area = ring_area(m, ring);
        if (!area) return NULL;
        long long rel = off - ring - RING_HEADER - BLOCK_HEADER;
        if (rel < 0 || (release && rel % LINE) || (uint64_t)(rel + BLOCK_HEADER + nbytes) > area) {
            PyErr_Format(PyExc_ValueError, "[%lld, +%lld) is not a payload of the ring at %lld", off,
                         nbytes, ring);
            return NULL;
        }
    }
    BlockObject *b = PyObject_New(BlockObject, &BlockType);
    if (!b) return NULL;
    Py_INCREF(m);
    b->mapping = m;
    b->offset = off;
    b->nbytes = nbytes;
    b->ring = release ? ring : -1;
    b->sealed = sealed;
    b->weakrefs = NULL;
    return (PyObject *)b;
}

/* mapping.block(offset, nbytes, ring=-1, release=True, sealed=False): see new_block(). */
static PyObject *mapping_block(MappingObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"offset", "nbytes", "ring", "release", "sealed", NULL};
    long long off, nbytes, ring = -1;
    int release = 1, sealed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LL|Lpp", kwlist, &off, &nbytes, &ring, &release,
                                     &sealed))
        return NULL;
    return new_block(self, off, nbytes, ring, release, sealed);
}

static void block_dealloc(BlockObject *self) {
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    if (self->ring >= 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        /* A peer that corrupted its own ring makes this fail; the space is lost, nothing else. */
        if (ring_release(self->mapping, self->ring, self->offset)) PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
    Py_DECREF(self->mapping);
    PyObject_Free(self);
}

static int block_getbuffer(BlockObject *self, Py_buffer *view, int flags) {
    if (self->sealed && (flags & PyBUF_WRITABLE)) {
        PyErr_SetString(PyExc_BufferError, "block is sealed (read-only)");
        view->obj = NULL;
        return -1;
    }
    return PyBuffer_FillInfo(view, (PyObject *)self, self->mapping->base + self->offset,
                             self->nbytes, self->sealed, flags);
}

static PyBufferProcs block_as_buffer = {(getbufferproc)block_getbuffer, NULL};

static PyObject *block_seal(BlockObject *self, PyObject *unused) {
    self->sealed = 1;
    Py_RETURN_NONE;
}

static PyObject *block_get_sealed(BlockObject *self, void *c) { return PyBool_FromLong(self->sealed); }
static PyObject *block_get_mapping(BlockObject *self, void *c) { return Py_NewRef(self->mapping); }
static PyObject *block_get_address(BlockObject *self, void *c) {
    return PyLong_FromVoidPtr(self->mapping->base + self->offset);
}

static PyMemberDef block_members[] = {
    {"offset", T_PYSSIZET, offsetof(BlockObject, offset), READONLY, "offset in the mapping"},
    {"nbytes", T_PYSSIZET, offsetof(BlockObject, nbytes), READONLY, "size in bytes"},
    {"ring", T_LONGLONG, offsetof(BlockObject, ring), READONLY, "owning ring header offset or -1"},
    {NULL}};

static PyGetSetDef block_getset[] = {
    {"sealed", (getter)block_get_sealed, NULL, "True once seal() was called", NULL},
    {"mapping", (getter)block_get_mapping, NULL, "the Mapping this block views", NULL},
    {"address", (getter)block_get_address, NULL, "address of the first byte in this process", NULL},
    {NULL}};

static PyMethodDef block_methods[] = {
    {"seal", (PyCFunction)block_seal, METH_NOARGS, "Refuse writable views from now on."},
    {NULL}};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ope_native.Block",
    .tp_basicsize = sizeof(BlockObject),
    .tp_dealloc = (destructor)block_dealloc,
    .tp_as_buffer = &block_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A window of a Mapping; returns its space to its ring when deallocated.",
    .tp_weaklistoffset = offsetof(BlockObject, weakrefs),
    .tp_members = block_members,
    .tp_getset = block_getset,
    .tp_methods = block_methods,
};

/* ---- Mapping type ---------------------------------------------------------------------- */

static PyObject *mapping_get_address(MappingObject *self, void *c) { return PyLong_FromVoidPtr(self->base); }

static PyMemberDef mapping_members[] = {
    {"size", T_PYSSIZET, offsetof(MappingObject, size), READONLY, "size in bytes"},
    {"private", T_INT, offsetof(MappingObject, private), READONLY, "1 for a copy-on-write mapping"},
    {NULL}};

static PyGetSetDef mapping_getset[] = {
    {"address", (getter)mapping_get_address, NULL, "base address in this process", NULL}, {NULL}};

static PyMethodDef mapping_methods[] = {
    {"load32", (PyCFunction)mapping_load32, METH_O, "load32(off): acquire load of a u32."},
    {"store32", (PyCFunction)mapping_store32, METH_VARARGS, "store32(off, v): release store of a u32."},
    {"load64", (PyCFunction)mapping_load64, METH_O, "load64(off): acquire load of a u64."},
    {"store64", (PyCFunction)mapping_store64, METH_VARARGS, "store64(off, v): release store of a u64."},
    {"add64", (PyCFunction)mapping_add64, METH_VARARGS, "add64(off, d): atomic add, returns new value."},
    {"wake32", (PyCFunction)mapping_wake32, METH_O, "wake32(off): futex-wake all waiters on a u32."},
    {"wait32", (PyCFunction)mapping_wait32, METH_VARARGS,
     "wait32(off, expected, timeout_s, spin_s=0) -> changed: spin, then futex-wait."},
    {"ring_init", (PyCFunction)mapping_ring_init, METH_VARARGS, "ring_init(off, size)"},
    {"ring_alloc", (PyCFunction)mapping_ring_alloc, METH_VARARGS,
     "ring_alloc(ring, nbytes) -> payload offset, or -1 when full."},
    {"ring_release", (PyCFunction)mapping_ring_release, METH_VARARGS, "ring_release(ring, payload)"},
    {"queue_init", (PyCFunction)mapping_queue_init, METH_VARARGS, "queue_init(off, size)"},
    {"queue_push", (PyCFunction)mapping_queue_push, METH_VARARGS,
     "queue_push(q, data, timeout_s, spin_s) -> queued"},
    {"queue_pop", (PyCFunction)mapping_queue_pop, METH_VARARGS,
     "queue_pop(q, timeout_s, spin_s) -> (bytes or None, spin_s for the next pop)"},
    {"queue_close", (PyCFunction)mapping_queue_close, METH_O, "queue_close(q)"},
    {"block", (PyCFunction)(void (*)(void))mapping_block, METH_VARARGS | METH_KEYWORDS,
     "block(offset, nbytes, ring=-1, release=True, sealed=False) -> Block"},
    {NULL}};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ope_native.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_as_buffer = &mapping_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mapping(fd, size, populate=False, private=False): a shared (or copy-on-write) "
              "mapping, unmapped when unreferenced.",
    .tp_weaklistoffset = offsetof(MappingObject, weakrefs),
    .tp_methods = mapping_methods,
    .tp_members = mapping_members,
    .tp_getset = mapping_getset,
    .tp_init = (initproc)mapping_init,
    .tp_new = PyType_GenericNew,
};

/* ---- CallStats ----------------------------------------------------------------------- */

/* A model's call counters, the bytes its calls copied into and out of the arena, and the
 * latencies of its last `window` served calls (ope/model.py). Each update runs whole under the
 * GIL, so threads sharing a model count every call without a lock of their own; on every
 * call, a Python lock around the counters cost more than the counting. call_alone() counts
 * the bytes of a lone call itself. */
typedef struct {
    PyObject_HEAD
    unsigned long long calls, errors, served, copied_in, copied_out;
    Py_ssize_t window;
    uint64_t *latencies_ns; /* served call k at k % window */
} CallStatsObject;

static int callstats_init(CallStatsObject *self, PyObject *args, PyObject *kw) {
    Py_ssize_t window;
    if (!PyArg_ParseTuple(args, "n", &window)) return -1;
    if (window < 1) {
        PyErr_SetString(PyExc_ValueError, "CallStats(window): window must be >= 1");
        return -1;
    }
    uint64_t *latencies = PyMem_Calloc((size_t)window, sizeof(uint64_t));
    if (!latencies) {
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(self->latencies_ns);
    self->latencies_ns = latencies;
    self->window = window;
    self->calls = self->errors = self->served = self->copied_in = self->copied_out = 0;
    return 0;
}

static void callstats_dealloc(CallStatsObject *self) {
    PyMem_Free(self->latencies_ns);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* record(start_ns, failed): one call ended; `start_ns` is when it began, by time.monotonic_ns()
 * (CLOCK_MONOTONIC, the clock monotonic_ns() reads). A failed call has no latency. */
static PyObject *callstats_record(CallStatsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "record(start_ns, failed)");
        return NULL;
    }
    unsigned long long start = PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred()) return NULL;
    int failed = PyObject_IsTrue(args[1]);
    if (failed < 0) return NULL;
    self->calls++;
    if (failed) {
        self->errors++;
    } else {
        uint64_t now = monotonic_ns();
        self->latencies_ns[self->served++ % (unsigned long long)self->window] = now > start ? now - start : 0;
    }
    Py_RETURN_NONE;
}

/* copied(in_bytes, out_bytes): count bytes a call copied into the arena and out of it. */
static PyObject *callstats_copied(CallStatsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "copied(in_bytes, out_bytes)");
        return NULL;
    }
    unsigned long long in_bytes = PyLong_AsUnsignedLongLong(args[0]),
                       out_bytes = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    self->copied_in += in_bytes;
    self->copied_out += out_bytes;
    Py_RETURN_NONE;
}

/* snapshot() -> (calls, errors, copied_in, copied_out, [latency_ns, ...]): the latencies of
 * the last served calls, in no particular order. */
static PyObject *callstats_snapshot(CallStatsObject *self, PyObject *unused) {
    Py_ssize_t count = self->served < (unsigned long long)self->window ? (Py_ssize_t)self->served : self->window;
    PyObject *latencies = PyList_New(count);
    for (Py_ssize_t i = 0; latencies && i < count; i++) {
        PyObject *ns = PyLong_FromUnsignedLongLong(self->latencies_ns[i]);
        if (!ns) Py_CLEAR(latencies);
        else PyList_SET_ITEM(latencies, i, ns);
    }
    return latencies ? Py_BuildValue("(KKKKN)", self->calls, self->errors, self->copied_in,
                                     self->copied_out, latencies)
                     : NULL;
}

static PyMethodDef callstats_methods[] = {
    {"record", (PyCFunction)(void (*)(void))callstats_record, METH_FASTCALL,
     "record(start_ns, failed): count a call that began at time.monotonic_ns() == start_ns."},
    {"copied", (PyCFunction)(void (*)(void))callstats_copied, METH_FASTCALL,
     "copied(in_bytes, out_bytes): count bytes copied into and out of the arena."},
    {"snapshot", (PyCFunction)callstats_snapshot, METH_NOARGS,
     "snapshot() -> (calls, errors, copied_in, copied_out, latencies_ns of the last served calls, unordered)"},
    {NULL}};

static PyTypeObject CallStatsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ope_native.CallStats",
    .tp_basicsize = sizeof(CallStatsObject),
    .tp_dealloc = (destructor)callstats_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CallStats(window): a model's call counters, bytes copied, and last `window` latencies.",
    .tp_methods = callstats_methods,
    .tp_init = (initproc)callstats_init,
    .tp_new = PyType_GenericNew,
};

/* ---- module ------------------------------------------------------------------------------ */

/* The worker's guarantee that it never outlives its host, whatever its model is doing: a
 * plain pthread (no GIL, so a model stuck in C code holding the GIL cannot delay it) sleeps in
 * poll() on a pidfd of the parent and on the read end of the host's pipe, whose write end only
 * the host holds, close-on-exec: end of file on it means the host died or exec'd another
 * program (which keeps the pid, so the pidfd alone misses it). The pidfd still catches a host
 * that died while a child forked behind Python's back holds the write end; the pipe alone
 * still works across pid namespaces. When the host is gone the watchdog SIGKILLs its own
 * process; the arena needs no clean-up, its segments are memfds, gone with their last holder.
 * getppid() is checked as well, for kernels without pidfd. PR_SET_PDEATHSIG is not used: it
 * fires when the parent *thread* exits, and hosts start workers from whichever thread makes
 * the call. */
typedef struct {
    pid_t parent;
    int pipe_fd;
} ParentWatch;

static void *parent_watch(void *arg) {
    ParentWatch *w = arg;
    struct pollfd p[2];
    nfds_t n = 0;
    int pidfd = (int)syscall(SYS_pidfd_open, w->parent, 0);
    if (pidfd >= 0) p[n++] = (struct pollfd){pidfd, POLLIN, 0};
    if (w->pipe_fd >= 0) p[n++] = (struct pollfd){w->pipe_fd, POLLIN, 0};
    for (;;) {
        if (getppid() != w->parent) break;
        /* With nothing to watch, poll() sleeps out its timeout and getppid() decides. */
        if (poll(p, n, 100) <= 0) continue;
        int gone = 0;
        for (nfds_t i = 0; i < n; i++) {
            /* The host never writes to the pipe: any readiness is end of file. */
            if (p[i].revents & ~POLLNVAL) gone = 1;
        }
        if (gone) break;
        /* A descriptor the model closed under us: watch what is left. */
        nfds_t kept = 0;
        for (nfds_t i = 0; i < n; i++) {
            if (!(p[i].revents & POLLNVAL)) p[kept++] = p[i];
        }
        n = kept;
    }
    kill(getpid(), SIGKILL);
    return NULL;
}

/* exit_with_parent(pid, pipe_fd=-1): see parent_watch(). */
static PyObject *exit_with_parent(PyObject *m, PyObject *args) {
    long parent;
    int pipe_fd = -1;
    if (!PyArg_ParseTuple(args, "l|i", &parent, &pipe_fd)) return NULL;
    if (pipe_fd >= 0) {
        struct stat st;
        if (fstat(pipe_fd, &st) != 0 || !S_ISFIFO(st.st_mode)) {
            PyErr_Format(PyExc_ValueError, "descriptor %d is not the read end of a pipe", pipe_fd);
            return NULL;
        }
    }
    if (getppid() != (pid_t)parent) {
        PyErr_Format(PyExc_RuntimeError, "parent %ld is already gone", parent);
        return NULL;
    }
    ParentWatch *w = PyMem_RawMalloc(sizeof *w); /* lives as long as the process */
    if (!w) return PyErr_NoMemory();
    w->parent = (pid_t)parent;
    w->pipe_fd = pipe_fd;
    pthread_t t;
    int err = pthread_create(&t, NULL, parent_watch, w);
    if (err) {
        PyMem_RawFree(w);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_detach(t);
    Py_RETURN_NONE;
}

/* ---- spec checks: the success path (the rules: ope/spec.py) -------------------------- */

/* 1 if `value` passes `row` = (name, exact type, dtype, rank, ((dim, size), ...),
 * ((dim, symbol), ...)) with symbol sizes in `sizes` (bound here as they are first seen),
 * 0 if not, -1 on error. */
static int passes(PyObject *row, PyObject *value, PyObject *sizes) {
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 6) {
        PyErr_SetString(PyExc_TypeError, "a check row is a 6-tuple");
        return -1;
    }
    /* Exactly the row's type, which is numpy.ndarray whenever it can match. */
    if ((PyObject *)Py_TYPE(value) != PyTuple_GET_ITEM(row, 1) || !PyArray_Check(value)) return 0;
    PyArrayObject *array = (PyArrayObject *)value;
    if ((PyObject *)PyArray_DESCR(array) != PyTuple_GET_ITEM(row, 2)) return 0;
    Py_ssize_t rank = PyLong_AsSsize_t(PyTuple_GET_ITEM(row, 3));
    if (rank == -1 && PyErr_Occurred()) return -1;
    if (PyArray_NDIM(array) != rank) return 0;
    npy_intp *dims = PyArray_DIMS(array);
    PyObject *fixed = PyTuple_GET_ITEM(row, 4), *symbols = PyTuple_GET_ITEM(row, 5);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(fixed); k++) {
        PyObject *pair = PyTuple_GET_ITEM(fixed, k);
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0)),
                   size = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
        if (PyErr_Occurred()) {
            /* A spec may fix a dim past any array's size: no array passes it. */
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            return 0;
        }
        if (index < 0 || index >= rank || dims[index] != size) return 0;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(symbols); k++) {
        PyObject *pair = PyTuple_GET_ITEM(symbols, k), *symbol = PyTuple_GET_ITEM(pair, 1);
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0));
        if (index == -1 && PyErr_Occurred()) return -1;
        if (index < 0 || index >= rank) return 0;
        PyObject *bound = PyDict_GetItemWithError(sizes, symbol);
        if (bound) {
            Py_ssize_t size = PyLong_AsSsize_t(bound);
            if (size == -1 && PyErr_Occurred()) return -1;
            if (size != dims[index]) return 0;
            continue;
        }
        if (PyErr_Occurred()) return -1;
        PyObject *size = PyLong_FromSsize_t(dims[index]);
        int failed = !size || PyDict_SetItem(sizes, symbol, size);
        Py_XDECREF(size);
        if (failed) return -1;
    }
    return 1;
}

/* check_plain(rows, values, sizes) -> {name: array}, or None (plain_arrays() in C)
 * The success path of ope.spec's check loop in one call: `values` is a dict holding, for
 * each row, a value of exactly the row's type (plain ndarrays) with the row's dtype object,
 * rank, fixed dims and symbol sizes. None as soon as anything else is seen: the Python loop
 * then converts what it may and words the error. */
static PyObject *plain_arrays(PyObject *rows, PyObject *values, PyObject *sizes) {
    if (!PyDict_CheckExact(values) || PyDict_GET_SIZE(values) != PyTuple_GET_SIZE(rows))
        Py_RETURN_NONE;
    PyObject *arrays = PyDict_New();
    for (Py_ssize_t i = 0; arrays && i < PyTuple_GET_SIZE(rows); i++) {
        PyObject *row = PyTuple_GET_ITEM(rows, i), *name = PyTuple_GetItem(row, 0);
        PyObject *value = name ? PyDict_GetItemWithError(values, name) : NULL;
        int ok = value ? passes(row, value, sizes) : PyErr_Occurred() ? -1 : 0;
        if (ok > 0 && PyDict_SetItem(arrays, name, value)) ok = -1;
        if (ok < 0) Py_CLEAR(arrays);
        if (ok == 0) {
            Py_DECREF(arrays);
            Py_RETURN_NONE;
        }
    }
    return arrays;
}

static PyObject *check_plain(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "check_plain(rows: tuple, values, sizes: dict)");
        return NULL;
    }
    return plain_arrays(args[0], args[1], args[2]);
}

/* ---- calls: tensor frames straight from and into the arena ------------------------------ */

/* What one call costs in Python objects is what a small call costs in time: these two
 * functions take a call's tensors into the arena and a frame out of it, and back, in one step
 * each (ope.arena.Arena.encode/decode wrap them). */

/* The Mapping and ring offset of a (Mapping, ring offset) pair, or of the last two items of
 * a (segment id, Mapping, ring offset) triple. */
static int read_ring(PyObject *t, MappingObject **m, long long *ring) {
    Py_ssize_t n = PyTuple_Check(t) ? PyTuple_GET_SIZE(t) : 0;
    if (n < 2 || !PyObject_TypeCheck(PyTuple_GET_ITEM(t, n - 2), &MappingType)) {
        PyErr_SetString(PyExc_TypeError, "a ring is named by (..., Mapping, ring offset)");
        return -1;
    }
    *m = (MappingObject *)PyTuple_GET_ITEM(t, n - 2);
    *ring = PyLong_AsLongLong(PyTuple_GET_ITEM(t, n - 1));
    return *ring == -1 && PyErr_Occurred() ? -1 : 0;
}

/* A new block of `nbytes` in one of our own rings (`own`: (segment id, Mapping, ring offset),
 * the newest last and tried first), growing the arena through `grow(nbytes)`, which returns
 * the new segment's triple, when none has room. */
static int alloc_own(PyObject *own, PyObject *grow, Py_ssize_t nbytes, PyObject **seg,
                     MappingObject **m, long long *ring, long long *payload) {
    for (Py_ssize_t i = PyList_GET_SIZE(own) - 1; i >= -1; i--) {
        PyObject *t = i >= 0 ? Py_NewRef(PyList_GET_ITEM(own, i))
                             : PyObject_CallFunction(grow, "n", nbytes);
        if (!t || read_ring(t, m, ring) || PyTuple_GET_SIZE(t) != 3) {
            if (t && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "own rings are triples");
            Py_XDECREF(t);
            return -1;
        }
        *payload = ring_alloc(*m, *ring, (uint64_t)nbytes);
        if (*payload >= 0) {
            *seg = Py_NewRef(PyTuple_GET_ITEM(t, 0));
            Py_DECREF(t);
            return 0;
        }
        Py_DECREF(t);
        if (*payload == -2) return -1;
    }
    PyErr_SetString(PyExc_RuntimeError, "a segment grown for a tensor has no room for it");
    return -1;
}

/* The Block at the end of `array`'s chain of ndarray bases (borrowed), or NULL. */
static BlockObject *block_under(PyArrayObject *array) {
    PyObject *base = PyArray_BASE(array);
    while (base && PyArray_Check(base)) base = PyArray_BASE((PyArrayObject *)base);
    return base && Py_TYPE(base) == &BlockType ? (BlockObject *)base : NULL;
}

/* Where `array` already lies in one of our `own` segments: 1 and its segment id and payload
 * offset, else 0. An array from model.empty() (or a C-contiguous slice of one) is a chain of
 * ndarray views whose last base is a Block of one of our mappings. */
static int find_in_arena(PyArrayObject *array, PyObject *own, unsigned long long *seg,
                         unsigned long long *offset) {
    if (!PyArray_IS_C_CONTIGUOUS(array)) return 0;
    BlockObject *b = block_under(array);
    if (!b) return 0;
    char *start = b->mapping->base + b->offset, *data = PyArray_BYTES(array);
    if (data < start || data + PyArray_NBYTES(array) > start + b->nbytes) return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(own); i++) {
        PyObject *t = PyList_GET_ITEM(own, i);
        if (PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 3 &&
            PyTuple_GET_ITEM(t, 1) == (PyObject *)b->mapping) {
            *seg = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 0));
            *offset = (unsigned long long)(b->offset + (data - start));
            return PyErr_Occurred() ? -1 : 1;
        }
    }
    return 0;
}

/* An array of `descr` (a new reference, which this steals) and `dims` over `nbytes` at `data`,
 * kept alive by `base` (a new reference, stolen too). */
static PyObject *array_over(PyArray_Descr *descr, int ndim, npy_intp *dims, char *data, int writable,
                            PyObject *base) {
    PyObject *array = PyArray_NewFromDescr(&PyArray_Type, descr, ndim, dims, NULL, data,
                                           writable ? NPY_ARRAY_WRITEABLE : 0, NULL);
    if (!array || PyArray_SetBaseObject((PyArrayObject *)array, base)) {
        if (!array) Py_DECREF(base);
        Py_XDECREF(array);
        return NULL;
    }
    return array;
}

/* Copies `array` to `payload` in `m`: one memcpy when it is C-contiguous, else numpy's strided
 * copy into a view of the destination. */
static int copy_into(PyArrayObject *array, MappingObject *m, long long payload) {
    npy_intp nbytes = PyArray_NBYTES(array);
    if (PyArray_IS_C_CONTIGUOUS(array)) {
        if (nbytes < (1 << 16)) {
            memcpy(m->base + payload, PyArray_BYTES(array), (size_t)nbytes);
        } else { /* milliseconds for big tensors: let other threads run meanwhile */
            Py_BEGIN_ALLOW_THREADS
            memcpy(m->base + payload, PyArray_BYTES(array), (size_t)nbytes);
            Py_END_ALLOW_THREADS
        }
        return 0;
    }
    Py_INCREF(PyArray_DESCR(array));
    PyObject *dest = array_over(PyArray_DESCR(array), PyArray_NDIM(array), PyArray_DIMS(array),
                                m->base + payload, 1, Py_NewRef((PyObject *)m));
    int failed = !dest || PyArray_CopyInto((PyArrayObject *)dest, array);
    Py_XDECREF(dest);
    return failed ? -1 : 0;
}

/* The frame code of an array's dtype: `codes[dtype]`, else `code_of(dtype)`; -1 with no error
 * set when it has none. */
static long long code_of_dtype(PyObject *dtype, PyObject *codes, PyObject *code_of) {
    PyObject *code = PyDict_GetItemWithError(codes, dtype);
    if (code) return PyLong_AsLongLong(code);
    if (PyErr_Occurred()) return -2;
    code = PyObject_CallOneArg(code_of, dtype);
    if (!code) return -2;
    long long c = code == Py_None ? -1 : PyLong_AsLongLong(code);
    Py_DECREF(code);
    return c == -1 && PyErr_Occurred() ? -2 : c;
}

/* Keeps the error just raised aside in `kept` (type, value, traceback) if it is the first, for
 * loops that go on past a failure and report the first; clears it otherwise. */
static void keep_first_error(PyObject **kept) {
    if (kept[0]) PyErr_Clear();
    else PyErr_Fetch(&kept[0], &kept[1], &kept[2]);
}

/* Raises the error keep_first_error() kept, if any: -1 then, else 0. */
static int raise_kept_error(PyObject **kept) {
    PyErr_Restore(kept[0], kept[1], kept[2]);
    return kept[0] ? -1 : 0;
}

/* Makes writable again the caller's arena arrays a call sealed (see seal_in_place()). It
 * leaves alone an array whose block was sealed for good meanwhile (model.seal). */
static void unseal(PyObject *sealed) {
    for (Py_ssize_t i = 0; sealed && i < PySequence_Fast_GET_SIZE(sealed); i++) {
        PyArrayObject *a = (PyArrayObject *)PySequence_Fast_GET_ITEM(sealed, i);
        BlockObject *b = PyArray_Check(a) ? block_under(a) : NULL;
        if (b && !b->sealed) PyArray_ENABLEFLAGS(a, NPY_ARRAY_WRITEABLE);
    }
}

/* Gives back a call's copies of its inputs in the arena (`scratch`: (Mapping, ring, payload)
 * triples, as encode_frame() lists them) and unseals the caller's arena arrays the call sealed
 * (`sealed`); either may be NULL. Returns 0, or -1 with an exception set when a ring refuses a
 * block (a corrupt ring); it gives back every block it can either way. */
static int release_inputs(PyObject *scratch, PyObject *sealed) {
    PyObject *kept[3] = {NULL, NULL, NULL}; /* the first refusal, the one reported */
    for (Py_ssize_t i = 0; scratch && i < PySequence_Fast_GET_SIZE(scratch); i++) {
        PyObject *b = PySequence_Fast_GET_ITEM(scratch, i);
        if (!PyTuple_Check(b) || PyTuple_GET_SIZE(b) != 3 ||
            !PyObject_TypeCheck(PyTuple_GET_ITEM(b, 0), &MappingType)) {
            PyErr_SetString(PyExc_TypeError, "scratch blocks are (Mapping, ring, payload)");
            return -1;
        }
        long long ring = PyLong_AsLongLong(PyTuple_GET_ITEM(b, 1)),
                  payload = PyLong_AsLongLong(PyTuple_GET_ITEM(b, 2));
        if (PyErr_Occurred() || ring_release((MappingObject *)PyTuple_GET_ITEM(b, 0), ring, payload))
            keep_first_error(kept);
    }
    unseal(sealed);
    return raise_kept_error(kept);
}

/* release_inputs() while an exception is being raised: that one stays the one raised. */
static void release_raising(PyObject *scratch, PyObject *sealed) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (release_inputs(scratch, sealed)) PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* release_inputs(scratch, sealed), lists or tuples: see release_inputs(). */
static PyObject *release_inputs_py(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !(PyList_Check(args[0]) || PyTuple_Check(args[0])) ||
        !(PyList_Check(args[1]) || PyTuple_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError, "release_inputs(scratch, sealed) takes two lists");
        return NULL;
    }
    return release_inputs(args[0], args[1]) ? NULL : Py_NewRef(Py_None);
}

/* Makes read-only the arrays of `in_place` (the caller's arena arrays a frame names) that are
 * writable, so that the worker never sees them change while the call is in flight. Returns
 * the list of those it sealed; NULL, with none sealed, on failure. */
static PyObject *seal_in_place(PyObject *in_place) {
    if (PyList_GET_SIZE(in_place) == 0) return Py_NewRef(in_place);
    PyObject *sealed = PyList_New(0);
    for (Py_ssize_t i = 0; sealed && i < PyList_GET_SIZE(in_place); i++) {
        PyArrayObject *a = (PyArrayObject *)PyList_GET_ITEM(in_place, i);
        if (!PyArray_ISWRITEABLE(a)) continue;
        if (PyList_Append(sealed, (PyObject *)a)) {
            unseal(sealed);
            Py_CLEAR(sealed);
        } else {
            PyArray_CLEARFLAGS(a, NPY_ARRAY_WRITEABLE);
        }
    }
    return sealed;
}

/* A tensor encode_tensors() copied into the arena: its block in one of our rings, the Mapping
 * referenced until the block is given back or handed on. */
typedef struct {
    MappingObject *m;
    long long ring, payload;
} Copy;

/* What encode_tensors() made for one frame. The copies live in C, not in Python objects: on a
 * small call each object costs as much as the copying; a Python list of them is made only for
 * a caller that gives them back later (copies_list()). `copies` points at `few` or at memory
 * of its own, so an Encoded stays where it was declared. */
typedef struct {
    PyObject *frame;  /* bytes */
    PyObject *sealed; /* the caller's arena arrays it sealed (a list); NULL when not looking */
    unsigned long long copied;
    Py_ssize_t ncopies;
    Copy *copies, few[4];
} Encoded;

/* Drops what `e` references; gives nothing back (the peer gives the blocks back, or a Python
 * list of them now holds them). */
static void encoded_clear(Encoded *e) {
    for (Py_ssize_t i = 0; i < e->ncopies; i++) Py_DECREF(e->copies[i].m);
    if (e->copies != e->few) PyMem_Free(e->copies);
    e->copies = e->few;
    e->ncopies = 0;
    Py_CLEAR(e->frame);
    Py_CLEAR(e->sealed);
}

/* Gives back the copies' blocks and unseals the sealed arrays (the peer is done with them, or
 * the frame never went), then clears `e`. Returns 0, or -1 with the first refusal of a ring
 * raised; it gives back every block it can either way. */
static int encoded_release(Encoded *e) {
    PyObject *kept[3] = {NULL, NULL, NULL};
    for (Py_ssize_t i = 0; i < e->ncopies; i++)
        if (ring_release(e->copies[i].m, e->copies[i].ring, e->copies[i].payload))
            keep_first_error(kept);
    unseal(e->sealed);
    encoded_clear(e);
    return raise_kept_error(kept);
}

/* encoded_release() while an exception is being raised: that one stays the one raised. */
static void encoded_release_raising(Encoded *e) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (encoded_release(e)) PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* The copies of `e` as a list of (Mapping, ring, payload), for release_inputs(); NULL on error. */
static PyObject *copies_list(const Encoded *e) {
    PyObject *list = PyList_New(e->ncopies);
    for (Py_ssize_t i = 0; list && i < e->ncopies; i++) {
        const Copy *c = &e->copies[i];
        PyObject *t = tuple_stealing(3, Py_NewRef(c->m), PyLong_FromLongLong(c->ring),
                                     PyLong_FromLongLong(c->payload));
        if (!t) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, t);
    }
    return list;
}

/* Puts each tensor of `tensors` (a dict name -> ndarray) in the arena and makes the frame naming
 * them, into `out`. With `look_in_arena`, an array that already lies in one of the `own`
 * segments (see alloc_own()) is named where it is and, if writable, sealed (seal_in_place());
 * every other one is copied into a new block of an own ring. `owned`: `tensors` is a dict that
 * only this call holds (plain_arrays() made it), iterated as it is; any other dict's items are
 * taken first, since callbacks (code_of, grow) and big copies (which let other threads run)
 * may see it change meanwhile. Returns 1 when encoded; 0, with nothing held, when a value is
 * not an ndarray or its dtype has no frame code (the caller's spec check then says what is
 * wrong); -1 with an exception set and nothing held. */
static int encode_tensors(int kind, unsigned long long call_id, PyObject *tensors, int owned,
                          PyObject *own, int look_in_arena, PyObject *codes, PyObject *code_of,
                          PyObject *grow, Encoded *out) {
    *out = (Encoded){NULL, NULL, 0, 0, NULL, {{0}}};
    out->copies = out->few;
    PyObject *items = owned ? NULL : PyDict_Items(tensors);
    if (!owned && !items) return -1;
    Py_ssize_t count = owned ? PyDict_GET_SIZE(tensors) : PyList_GET_SIZE(items), pos = 0;
    if (check_frame_size(kind, count)) {
        Py_XDECREF(items);
        return -1;
    }
    Entry stack[4], *e = count <= 4 ? stack : PyMem_Malloc(sizeof(Entry) * (size_t)count);
    PyObject *in_place = look_in_arena ? PyList_New(0) : NULL;
    if (count > 4) out->copies = PyMem_Malloc(sizeof(Copy) * (size_t)count);
    int status = -1;
    if (!e || !out->copies || (look_in_arena && !in_place)) {
        if (!e || !out->copies) PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name, *array;
        if (owned) {
            PyDict_Next(tensors, &pos, &name, &array);
        } else {
            name = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
            array = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1);
        }
        if (!PyArray_Check(array)) goto not_encodable;
        PyArrayObject *a = (PyArrayObject *)array;
        long long code = code_of_dtype((PyObject *)PyArray_DESCR(a), codes, code_of);
        if (code == -2) goto fail;
        if (code < 0) goto not_encodable;
        Entry *x = &e[i];
        x->name = PyUnicode_AsUTF8AndSize(name, &x->name_len);
        x->code = (unsigned long long)code;
        x->itemsize = (unsigned long long)PyArray_ITEMSIZE(a);
        x->nbytes = (unsigned long long)PyArray_NBYTES(a);
        x->ndim = PyArray_NDIM(a);
        if (!x->name || entry_in_range(x)) goto fail;
        for (Py_ssize_t d = 0; d < x->ndim; d++) x->dims[d] = (unsigned long long)PyArray_DIMS(a)[d];
        int found = look_in_arena ? find_in_arena(a, own, &x->seg, &x->offset) : 0;
        if (found < 0 || (found && PyList_Append(in_place, array))) goto fail;
        if (found) continue;
        PyObject *seg;
        Copy *c = &out->copies[out->ncopies];
        if (alloc_own(own, grow, PyArray_NBYTES(a), &seg, &c->m, &c->ring, &c->payload)) goto fail;
        Py_INCREF(c->m);
        out->ncopies++;
        x->seg = PyLong_AsUnsignedLongLong(seg);
        x->offset = (unsigned long long)c->payload;
        Py_DECREF(seg);
        if (copy_into(a, c->m, c->payload)) goto fail;
        out->copied += x->nbytes;
    }
    out->frame = write_frame(kind, call_id, out->copied, e, count);
    if (out->frame && look_in_arena) out->sealed = seal_in_place(in_place);
    if (out->frame && (out->sealed || !look_in_arena)) status = 1;
    else goto fail;
    goto done;
not_encodable:
    status = 0;
fail:
    /* Give back what this call allocated: the frame naming it is never sent. */
    encoded_release_raising(out);
done:
    if (e && e != stack) PyMem_Free(e);
    Py_XDECREF(in_place);
    Py_XDECREF(items);
    return status;
}

/* encode_frame(kind, call_id, tensors, own, in_place, codes, code_of, grow)
 *     -> (frame, copied, scratch, sealed) or None
 * encode_tensors() for Python (the arena's encode): `scratch` lists the copies' blocks as
 * (Mapping, ring, payload), `sealed` the caller's arena arrays sealed, and `copied` counts the
 * bytes copied; the sender gives both back with release_inputs() once the peer is done with
 * them. None, with nothing allocated, when a value is not an ndarray or its dtype has no
 * frame code. */
static PyObject *encode_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "encode_frame takes 8 arguments");
        return NULL;
    }
    PyObject *tensors = args[2], *own = args[3], *codes = args[5];
    int kind = PyLong_AsLong(args[0]), look_in_arena = PyObject_IsTrue(args[4]);
    unsigned long long call_id = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (!PyDict_Check(tensors) || !PyList_Check(own) || !PyDict_Check(codes)) {
        PyErr_SetString(PyExc_TypeError, "encode_frame: tensors and codes are dicts, own a list");
        return NULL;
    }
    Encoded enc;
    int status = encode_tensors(kind, call_id, tensors, 0, own, look_in_arena, codes, args[6],
                                args[7], &enc);
    if (status <= 0) return status < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *result = tuple_stealing(4, Py_NewRef(enc.frame), PyLong_FromUnsignedLongLong(enc.copied),
                                      copies_list(&enc),
                                      enc.sealed ? Py_NewRef(enc.sealed) : PyList_New(0));
    if (result) encoded_clear(&enc);
    else encoded_release_raising(&enc);
    return result;
}

/* The array an entry of the peer's frame names, viewing its bytes in place (a Block that the
 * host gives back to the worker's ring when dropped; on the worker, sealed and not given
 * back). `rings` holds the peer's segments mapped so far; `map_segment(id) -> (Mapping, ring
 * offset)` maps another, and refuses an id the peer does not own. */
static PyObject *entry_array(const Entry *e, int host, PyObject *rings, PyObject *dtypes,
                             PyObject *string_dtype, PyObject *map_segment) {
    PyObject *key = PyLong_FromUnsignedLongLong(e->seg);
    if (!key) return NULL;
    PyObject *pair = Py_XNewRef(PyDict_GetItemWithError(rings, key));
    if (!pair && !PyErr_Occurred()) pair = PyObject_CallOneArg(map_segment, key);
    Py_DECREF(key);
    MappingObject *m;
    long long ring;
    PyObject *block = !pair || read_ring(pair, &m, &ring) ? NULL
        : new_block(m, (long long)e->offset, (long long)e->nbytes, ring, host, !host);
    Py_XDECREF(pair);
    if (!block) return NULL;
    PyObject *dtype = e->code == STRING_CODE
        ? PyObject_CallFunction(string_dtype, "K", e->itemsize)
        : Py_XNewRef(PyTuple_GetItem(dtypes, (Py_ssize_t)e->code));
    if (!dtype || !PyArray_DescrCheck(dtype)) {
        if (dtype) PyErr_SetString(PyExc_TypeError, "dtypes must be numpy dtypes");
        Py_XDECREF(dtype);
        Py_DECREF(block);
        return NULL;
    }
    npy_intp dims[FRAME_MAX_DIMS];
    for (Py_ssize_t d = 0; d < e->ndim; d++) dims[d] = (npy_intp)e->dims[d];
    BlockObject *b = (BlockObject *)block;
    return array_over((PyArray_Descr *)dtype, (int)e->ndim, dims, b->mapping->base + b->offset,
                      !b->sealed, block);
}

/* decode_frame(data, host, peer rings, dtypes, string_dtype, map_segment)
 *     -> (kind, call_id, copied, {name: array})
 * The tensors of a frame the peer sent, as views on the arena (see entry_array()). The whole
 * frame is checked before any view is made; ValueError (or numpy's refusal) if it is bad. */
static PyObject *decode_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "decode_frame takes 6 arguments");
        return NULL;
    }
    int host = PyObject_IsTrue(args[1]);
    PyObject *rings = args[2], *dtypes = args[3], *string_dtype = args[4], *map_segment = args[5];
    if (host < 0) return NULL;
    if (!PyDict_Check(rings)) {
        PyErr_SetString(PyExc_TypeError, "decode_frame: rings is a dict");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    const char *p = view.buf;
    Py_ssize_t len = view.len, pos = FRAME_HEADER, count = frame_count(p, len);
    Entry stack[4], *e = count <= 4 ? stack : PyMem_Malloc(sizeof(Entry) * (size_t)(count > 0 ? count : 1));
    PyObject *tensors = NULL, *result = NULL;
    if (count < 0 || !e) {
        if (!e) PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t starts[4], *start = count <= 4 ? starts : PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)count);
    if (!start) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        start[i] = pos;
        if (parse_entry(p, &pos, len, &e[i])) goto done_starts;
    }
    if (pos != len) {
        frame_error("bytes after the last entry", pos);
        goto done_starts;
    }
    tensors = PyDict_New();
    for (Py_ssize_t i = 0; tensors && i < count; i++) {
        PyObject *name = entry_name(&e[i], start[i]), *array = NULL;
        if (name) array = entry_array(&e[i], host, rings, dtypes, string_dtype, map_segment);
        if (!array || PyDict_SetItem(tensors, name, array)) Py_CLEAR(tensors);
        Py_XDECREF(name);
        Py_XDECREF(array);
    }
    if (tensors)
        result = tuple_stealing(4, PyLong_FromLong((uint8_t)p[1]), PyLong_FromUnsignedLongLong(get_u64(p + 8)),
                                PyLong_FromUnsignedLongLong(get_u64(p + 16)), tensors);
done_starts:
    if (start != starts) PyMem_Free(start);
done:
    if (e && e != stack) PyMem_Free(e);
    PyBuffer_Release(&view);
    return result;
}

/* ---- inputs a model keeps past its call ------------------------------------------------ */

/* The worker maps the host's segments copy-on-write (ope/arena.py), and the host reuses an
 * input's block as soon as the call is answered. A model that keeps an input, or a view or
 * tensor over it, would see the next call's bytes appear in it. So before a call is answered,
 * every input referenced beyond the call's own dict gets a private copy of its pages (each
 * page written once with the byte already there), and its segment's mapping leaves `rings`:
 * later frames map the segment afresh (decode_frame's map_segment), while what the model kept
 * goes on reading its frozen copy. */

static void copy_pages_privately(char *start, Py_ssize_t nbytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    char *end = start + nbytes;
    for (volatile char *p = start; p < end; p = (char *)(((uintptr_t)p / page + 1) * page)) {
        char byte = *p;
        *p = byte;
    }
}

/* Removes from `rings` (segment id -> (Mapping, ring offset)) the entries of mapping `m`. */
static int forget_mapping(PyObject *rings, MappingObject *m) {
    PyObject *stale = PyList_New(0), *key, *value;
    Py_ssize_t pos = 0;
    while (stale && PyDict_Next(rings, &pos, &key, &value))
        if (PyTuple_Check(value) && PyTuple_GET_SIZE(value) > 0 &&
            PyTuple_GET_ITEM(value, 0) == (PyObject *)m && PyList_Append(stale, key))
            Py_CLEAR(stale);
    for (Py_ssize_t i = 0; stale && i < PyList_GET_SIZE(stale); i++)
        if (PyDict_DelItem(rings, PyList_GET_ITEM(stale, i))) Py_CLEAR(stale);
    Py_XDECREF(stale);
    return stale ? 0 : -1;
}

/* The inputs in `arrays` (name -> array) that something besides the dict still holds get
 * private pages, and their mappings leave `rings`. Returns how many, or -1 on error. */
static Py_ssize_t keep_kept_inputs(PyObject *arrays, PyObject *rings) {
    Py_ssize_t pos = 0, kept = 0;
    PyObject *name, *value;
    while (PyDict_Next(arrays, &pos, &name, &value)) {
        BlockObject *b = PyArray_Check(value) ? block_under((PyArrayObject *)value) : NULL;
        if (!b || !b->mapping->private || (Py_REFCNT(value) == 1 && Py_REFCNT(b) == 1)) continue;
        copy_pages_privately(b->mapping->base + b->offset, b->nbytes);
        if (forget_mapping(rings, b->mapping)) return -1;
        kept++;
    }
    return kept;
}

/* keep_kept_inputs(arrays, rings) -> count: see keep_kept_inputs(). */
static PyObject *keep_kept_inputs_py(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "keep_kept_inputs(arrays, rings) takes two dicts");
        return NULL;
    }
    Py_ssize_t kept = keep_kept_inputs(args[0], args[1]);
    return kept < 0 ? NULL : PyLong_FromSsize_t(kept);
}

/* ---- the worker's loop for calls ------------------------------------------------------- */

/* The exception being raised, normalised and with its traceback attached, as a new reference
 * (the error indicator is cleared): a value Python can format later. */
static PyObject *take_exception(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* Whether `outputs` is a dict whose keys are exactly the set `names`. */
static int has_exactly(PyObject *outputs, PyObject *names) {
    if (!PyDict_CheckExact(outputs) || PyDict_GET_SIZE(outputs) != PySet_GET_SIZE(names)) return 0;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(outputs, &pos, &key, &value)) {
        int in = PySet_Contains(names, key);
        if (in != 1) {
            PyErr_Clear(); /* an unhashable key: Python's check words it */
            return 0;
        }
    }
    return 1;
}

/* Runs one INFER the loop decoded: the model, then its RESULT frame into the queue. Returns 1
 * when answered, 0 when the queue closed, -1 with an exception set, or 2 with `*left` set to
 * the (call_id, arrays, outputs, exception) that Python must answer: the model raised, or its
 * outputs are not a dict of the spec's names that a frame carries as they are. */
static int answer_call(PyObject *message, PyObject *run, PyObject *names, PyObject *const *encoding,
                       PyObject *rings, MappingObject *m, long long out_q, long long in_q,
                       double spin_s, PyObject **left) {
    PyObject *call_id = PyTuple_GET_ITEM(message, 1), *arrays = PyTuple_GET_ITEM(message, 3);
    PyObject *outputs = PyObject_CallOneArg(run, arrays), *error = NULL;
    unsigned long long id = PyLong_AsUnsignedLongLong(call_id); /* decode_frame made it from a u64 */
    Encoded e;
    int encoded = outputs && has_exactly(outputs, names)
        ? encode_tensors(MSG_RESULT, id, outputs, 0, encoding[0], 0, encoding[1], encoding[2],
                         encoding[3], &e)
        : 0;
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* KeyboardInterrupt, SystemExit */
            Py_XDECREF(outputs);
            return -1;
        }
        error = take_exception();
    }
    if (encoded > 0) { /* the host gives the outputs' blocks back as it drops its views */
        Py_CLEAR(outputs); /* an output may be an input: only what the model kept counts */
        if (keep_kept_inputs(arrays, rings) < 0) {
            encoded_release_raising(&e);
            return -1;
        }
        int pushed = queue_push_record(m, out_q, PyBytes_AS_STRING(e.frame), PyBytes_GET_SIZE(e.frame),
                                       -1.0, spin_s, in_q);
        encoded_clear(&e);
        return pushed;
    }
    *left = Py_BuildValue("(OONN)", call_id, arrays, outputs ? outputs : Py_NewRef(Py_None),
                          error ? error : Py_NewRef(Py_None));
    return *left ? 2 : -1;
}

/* serve_calls(mapping, in_q, out_q, spin_s, decoding, encoding, run, output_names)
 *     -> (spin_s, data, call)
 * The worker's loop while calls come (workers/worker.py): it pops each message, and while it
 * is an INFER frame, decodes it (decode_frame with the `decoding` arguments after data), runs
 * `run(arrays)`, encodes the outputs (encode_frame with the `encoding` arguments: own, codes,
 * code_of, grow) and pushes the RESULT, with no Python of its own in between. It returns, with
 * the spin to use next, what it leaves to Python: data None once the queue closed; any other
 * message, or a frame that does not decode, as `data` with call None; or an INFER it ran but
 * could not answer as `call` (see answer_call()). */
static PyObject *serve_calls(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8 || !PyObject_TypeCheck(args[0], &MappingType) || !PyTuple_Check(args[4]) ||
        PyTuple_GET_SIZE(args[4]) != 5 || !PyTuple_Check(args[5]) || PyTuple_GET_SIZE(args[5]) != 4 ||
        !PyAnySet_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "serve_calls(mapping, in_q, out_q, spin_s, "
                                         "(5 decoding args), (4 encoding args), run, output_names)");
        return NULL;
    }
    MappingObject *m = (MappingObject *)args[0];
    long long in_q = PyLong_AsLongLong(args[1]), out_q = PyLong_AsLongLong(args[2]);
    double spin_s = PyFloat_AsDouble(args[3]);
    if (PyErr_Occurred()) return NULL;
    PyObject *decode_args[6];
    for (int i = 0; i < 5; i++) decode_args[i + 1] = PyTuple_GET_ITEM(args[4], i);
    for (;;) {
        PyObject *data = queue_pop_record(m, in_q, -1.0, &spin_s), *message = NULL, *call = NULL;
        if (!data) return NULL;
        if (data != Py_None && PyBytes_GET_SIZE(data) >= FRAME_HEADER &&
            (uint8_t)PyBytes_AS_STRING(data)[0] == FRAME_MARKER && PyBytes_AS_STRING(data)[1] == MSG_INFER) {
            decode_args[0] = data;
            message = decode_frame(NULL, decode_args, 6);
            if (!message && PyErr_ExceptionMatches(PyExc_Exception))
                PyErr_Clear(); /* Python decodes it again, and words the ProtocolError */
            else if (!message) {
                Py_DECREF(data);
                return NULL;
            }
        }
        if (!message) return Py_BuildValue("(dNO)", spin_s, data, Py_None);
        int answered = answer_call(message, args[6], args[7], &PyTuple_GET_ITEM(args[5], 0),
                                   decode_args[2], m, out_q, in_q, spin_s, &call);
        Py_DECREF(message);
        if (answered == 1) {
            Py_DECREF(data);
            continue;
        }
        if (answered == 0) Py_SETREF(data, Py_NewRef(Py_None));
        if (answered < 0) {
            Py_DECREF(data);
            return NULL;
        }
        return Py_BuildValue("(dNN)", spin_s, data, call ? call : Py_NewRef(Py_None));
    }
}

/* ---- the host's call with no other in flight ------------------------------------------ */

/* call_alone()'s outcomes */
enum { CALL_ANSWERED, CALL_SENT, CALL_NOT_SENT, CALL_NOT_PLAIN, CALL_UNCHECKED };

/* Whether `reply` is the RESULT frame of call `call_id`. */
static int is_result_of(PyObject *reply, unsigned long long call_id) {
    const char *p = PyBytes_AS_STRING(reply);
    return PyBytes_GET_SIZE(reply) >= FRAME_HEADER && (uint8_t)p[0] == FRAME_MARKER &&
           p[1] == MSG_RESULT && get_u64(p + 8) == call_id;
}

/* The outputs of `reply`, this call's RESULT frame, decoded (decode_frame with the `decoding`
 * arguments); *copied_out gets the bytes the worker copied for them. With `out_rows` (not None),
 * *checked says whether the outputs pass them as they are, symbols bound as in `bindings`;
 * those that pass come in the rows' order (plain_arrays()). NULL with no error set if the
 * frame did not decode (or memory ran out): Python decodes it again and words the
 * ProtocolError (or raises). NULL with an error set on an interrupt. */
static PyObject *decode_result(PyObject *reply, PyObject *decoding, PyObject *out_rows,
                               PyObject *bindings, unsigned long long *copied_out, int *checked) {
    PyObject *decode_args[6] = {reply}, *message, *outputs = NULL;
    for (int i = 0; i < 5; i++) decode_args[i + 1] = PyTuple_GET_ITEM(decoding, i);
    *checked = 0;
    message = decode_frame(NULL, decode_args, 6);
    if (message) {
        outputs = Py_NewRef(PyTuple_GET_ITEM(message, 3));
        *copied_out = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(message, 2)); /* a u64 */
        Py_DECREF(message);
        if (out_rows != Py_None) {
            PyObject *sizes = PyDict_Copy(bindings),
                     *arrays = sizes ? plain_arrays(out_rows, outputs, sizes) : NULL;
            Py_XDECREF(sizes);
            if (arrays && arrays != Py_None) {
                *checked = 1;
                Py_SETREF(outputs, arrays);
            } else {
                Py_XDECREF(arrays);
                PyErr_Clear(); /* out of memory: Python's check meets it again, and raises */
            }
        }
    }
    if (!outputs && PyErr_ExceptionMatches(PyExc_Exception)) PyErr_Clear();
    return outputs;
}

/* The inputs to send: `tensors` as they are without `checks`; with them, `tensors` if they
 * pass the input rows as they are (plain_arrays(), *bindings getting the sizes of the
 * symbols), else None. NULL on error. */
static PyObject *checked_inputs(PyObject *tensors, PyObject *checks, PyObject **bindings) {
    if (checks == Py_None) {
        *bindings = Py_NewRef(Py_None);
        return Py_NewRef(tensors);
    }
    *bindings = PyDict_New();
    if (!*bindings) return NULL;
    PyObject *arrays = plain_arrays(PyTuple_GET_ITEM(checks, 0), tensors, *bindings);
    if (!arrays) Py_CLEAR(*bindings);
    return arrays;
}

/* call_alone(mapping, out_q, in_q, spin_s, call_id, tensors, encoding, decoding, checks, stats)
 *     -> (outcome, spin_s, copied, reply, held, bindings)
 * The host's side of a call with no other in flight (ope/host.py, _call_alone), in one call.
 * `checks` is None when `tensors` are inputs already checked by ope/spec.py, or (input rows,
 * output rows) when they are the caller's: then this is all of a lone infer, the spec's
 * success path included (plain_arrays()), and `bindings` the sizes of the symbols. It puts the
 * inputs in the arena and seals the caller's arena arrays (encode_tensors() with the `encoding`
 * arguments, in place where they already lie there), pushes the INFER frame on `out_q`, and
 * waits for the answer on `in_q` within one spin window. `spin_s` comes back as the spin for
 * the next wait (queue_pop_record()); `copied` is the bytes copied in, which `stats` (the
 * model's CallStats, or None) counts, and the bytes of the outputs of a RESULT decoded here.
 *   CALL_ANSWERED: the answer was this call's RESULT, it decoded, and with `checks` its
 *     outputs passed them (decode_result()); the inputs are released, `reply` is the outputs
 *     by name, `held` None.
 *   CALL_UNCHECKED: the same, with outputs that do not pass the output rows as they are:
 *     Python checks them, and converts them or words the error.
 *   CALL_SENT: anything else, left to Python: `reply` is the message's bytes, None if none
 *     came within the window, or the exception receiving raised; `held` is (scratch, sealed),
 *     the inputs the call still holds (see release_inputs()).
 *   CALL_NOT_SENT: the queue was closed (`reply` None) or sending raised (`reply` the
 *     exception); the inputs are released.
 *   CALL_NOT_PLAIN: an input does not pass the input rows as it is; nothing was sent, and
 *     Python checks the inputs (converts them or words the error).
 * Raises, holding nothing, when the inputs did not encode (nothing was sent), when giving back
 * the inputs failed (a corrupt ring) or when out of memory. */
static PyObject *call_alone(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 10 || !PyObject_TypeCheck(args[0], &MappingType) || !PyTuple_Check(args[6]) ||
        PyTuple_GET_SIZE(args[6]) != 4 || !PyTuple_Check(args[7]) || PyTuple_GET_SIZE(args[7]) != 5 ||
        (args[8] != Py_None && (!PyTuple_Check(args[8]) || PyTuple_GET_SIZE(args[8]) != 2 ||
                                !PyTuple_Check(PyTuple_GET_ITEM(args[8], 0)) ||
                                !PyTuple_Check(PyTuple_GET_ITEM(args[8], 1)))) ||
        (args[9] != Py_None && !PyObject_TypeCheck(args[9], &CallStatsType))) {
        PyErr_SetString(PyExc_TypeError, "call_alone(mapping, out_q, in_q, spin_s, call_id, tensors, "
                                         "(4 encoding args), (5 decoding args), "
                                         "None or (input rows, output rows), CallStats or None)");
        return NULL;
    }
    CallStatsObject *stats = args[9] == Py_None ? NULL : (CallStatsObject *)args[9];
    MappingObject *m = (MappingObject *)args[0];
    long long out_q = PyLong_AsLongLong(args[1]), in_q = PyLong_AsLongLong(args[2]);
    double spin_s = PyFloat_AsDouble(args[3]);
    unsigned long long call_id = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    PyObject *out_rows = args[8] == Py_None ? Py_None : PyTuple_GET_ITEM(args[8], 1), *bindings;
    PyObject *tensors = checked_inputs(args[5], args[8], &bindings);
    if (!tensors) return NULL;
    if (tensors == Py_None) {
        Py_DECREF(tensors);
        Py_DECREF(bindings);
        return Py_BuildValue("(idiOOO)", CALL_NOT_PLAIN, spin_s, 0, Py_None, Py_None, Py_None);
    }
    PyObject *const *enc = &PyTuple_GET_ITEM(args[6], 0);
    Encoded e;
    int status = encode_tensors(MSG_INFER, call_id, tensors, args[8] != Py_None, enc[0], 1, enc[1],
                                enc[2], enc[3], &e);
    Py_DECREF(tensors);
    if (status == 0) PyErr_SetString(PyExc_TypeError, "call_alone: an input is not an array a frame carries");
    if (status <= 0) {
        Py_DECREF(bindings);
        return NULL;
    }
    if (stats) stats->copied_in += e.copied;
    PyObject *reply, *held = NULL, *result = NULL;
    int outcome = CALL_SENT,
        pushed = queue_push_record(m, out_q, PyBytes_AS_STRING(e.frame), PyBytes_GET_SIZE(e.frame),
                                   -1.0, spin_s, in_q);
    if (pushed != 1) {
        outcome = CALL_NOT_SENT;
        reply = pushed < 0 ? take_exception() : Py_NewRef(Py_None);
    } else {
        reply = queue_pop_record(m, in_q, spin_s, &spin_s);
        if (!reply) reply = take_exception();
        else if (reply != Py_None && is_result_of(reply, call_id)) {
            int checked;
            unsigned long long copied_out;
            PyObject *outputs = decode_result(reply, args[7], out_rows, bindings, &copied_out, &checked);
            if (outputs) {
                outcome = out_rows == Py_None || checked ? CALL_ANSWERED : CALL_UNCHECKED;
                if (stats) stats->copied_out += copied_out;
                Py_SETREF(reply, outputs);
            } else if (PyErr_Occurred()) {
                Py_SETREF(reply, take_exception()); /* an interrupt: the reply is lost with it */
            }
        }
    }
    unsigned long long copied = e.copied;
    if (outcome == CALL_SENT) { /* the call still holds its inputs: Python's lists of them */
        held = tuple_stealing(2, copies_list(&e), Py_NewRef(e.sealed));
        if (held) encoded_clear(&e);
        else encoded_release_raising(&e);
    } else if (!encoded_release(&e)) {
        held = Py_NewRef(Py_None);
    }
    if (held)
        result = tuple_stealing(6, PyLong_FromLong(outcome), PyFloat_FromDouble(spin_s),
                                PyLong_FromUnsignedLongLong(copied), Py_NewRef(reply),
                                Py_NewRef(held), Py_NewRef(bindings));
    if (!result && held && held != Py_None)
        release_raising(PyTuple_GET_ITEM(held, 0), PyTuple_GET_ITEM(held, 1));
    Py_XDECREF(held);
    Py_DECREF(reply);
    Py_DECREF(bindings);
    return result;
}

static PyMethodDef module_methods[] = {
    {"pack_frame", pack_frame, METH_VARARGS,
     "pack_frame(kind, call_id, copied, entries) -> bytes: a tensor frame (ope/protocol.py)."},
    {"unpack_frame", unpack_frame, METH_O,
     "unpack_frame(data) -> (kind, call_id, copied, entries); ValueError if malformed."},
    {"encode_frame", (PyCFunction)(void (*)(void))encode_frame, METH_FASTCALL,
     "encode_frame(kind, call_id, tensors, own, in_place, codes, code_of, grow) -> (frame, copied, scratch, sealed) or None."},
    {"decode_frame", (PyCFunction)(void (*)(void))decode_frame, METH_FASTCALL,
     "decode_frame(data, host, peer_rings, dtypes, string_dtype, map_segment) -> (kind, call_id, copied, tensors)."},
    {"serve_calls", (PyCFunction)(void (*)(void))serve_calls, METH_FASTCALL,
     "serve_calls(mapping, in_q, out_q, spin_s, decoding, encoding, run, output_names) -> (spin_s, data, call): the worker's loop for calls."},
    {"call_alone", (PyCFunction)(void (*)(void))call_alone, METH_FASTCALL,
     "call_alone(mapping, out_q, in_q, spin_s, call_id, tensors, encoding, decoding, checks, stats) -> (outcome, spin_s, copied, reply, held, bindings): the host's lone call."},
    {"release_inputs", (PyCFunction)(void (*)(void))release_inputs_py, METH_FASTCALL,
     "release_inputs(scratch, sealed): give back a call's input copies and unseal the caller's arena arrays."},
    {"keep_kept_inputs", (PyCFunction)(void (*)(void))keep_kept_inputs_py, METH_FASTCALL,
     "keep_kept_inputs(arrays, peer_rings) -> count: private pages for inputs a model kept."},
    {"check_plain", (PyCFunction)(void (*)(void))check_plain, METH_FASTCALL,
     "check_plain(rows, values, sizes) -> {name: array} or None: ope.spec's success path."},
    {"exit_with_parent", exit_with_parent, METH_VARARGS,
     "exit_with_parent(pid, pipe_fd=-1): when parent `pid` is gone, or the pipe whose read end is `pipe_fd` reaches end of file, SIGKILL this process."},
    {NULL}};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "ope_native._native", "Native core of ope's shared-memory bridge.", -1,
    module_methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&BlockType) < 0 ||
        PyType_Ready(&CallStatsType) < 0)
        return NULL;
    import_array();
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Mapping", (PyObject *)&MappingType) ||
        PyModule_AddObjectRef(m, "Block", (PyObject *)&BlockType) ||
        PyModule_AddObjectRef(m, "CallStats", (PyObject *)&CallStatsType) ||
        PyModule_AddIntConstant(m, "LINE", LINE) ||
        PyModule_AddIntConstant(m, "RING_HEADER", RING_HEADER) ||
        PyModule_AddIntConstant(m, "BLOCK_HEADER", BLOCK_HEADER) ||
        PyModule_AddIntConstant(m, "QUEUE_HEADER", Q_DATA) ||
        PyModule_AddIntConstant(m, "CALL_ANSWERED", CALL_ANSWERED) ||
        PyModule_AddIntConstant(m, "CALL_SENT", CALL_SENT) ||
        PyModule_AddIntConstant(m, "CALL_NOT_SENT", CALL_NOT_SENT) ||
        PyModule_AddIntConstant(m, "CALL_NOT_PLAIN", CALL_NOT_PLAIN) ||
        PyModule_AddIntConstant(m, "CALL_UNCHECKED", CALL_UNCHECKED) ||
        PyModule_AddObject(m, "SPIN_S", PyFloat_FromDouble(SPIN_S))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
