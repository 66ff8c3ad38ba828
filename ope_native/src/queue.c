/* queue.c: the control channel's queues, single producer and single consumer each.
 *
 * A record is copied in and published by a release store of head; a waiter spins briefly and
 * then sleeps on a futex, and spins next time only while the other side answers quickly. Every
 * length and position the other process wrote is validated before it is used, so a corrupt
 * queue raises ValueError instead of reading out of bounds.
 */
#include "queue.h"

#include <sched.h>

#include "platform.h"

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

PyObject *mapping_queue_init(MappingObject *self, PyObject *args) {
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
int queue_push_record(MappingObject *m, long long q, const char *buf, Py_ssize_t len,
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
            /* Relaxed: where this side runs, a hint for the consumer's spin (wait_for_change). */
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
PyObject *mapping_queue_push(MappingObject *self, PyObject *args) {
    long long q, peer_q = -1;
    Py_buffer msg;
    double timeout_s, spin_s;
    if (!PyArg_ParseTuple(args, "Ly*dd|L", &q, &msg, &timeout_s, &spin_s, &peer_q)) return NULL;
    int status = queue_push_record(self, q, msg.buf, msg.len, timeout_s, spin_s, peer_q);
    PyBuffer_Release(&msg);
    return status < 0 ? NULL : PyBool_FromLong(status);
}

/* The next record, as new bytes; None (a new reference) if nothing came before the timeout or
 * the queue was closed with nothing left in it; NULL with an exception set. `*spin_s` is the
 * spin for this wait and becomes the one for the next: SPIN_S only if the producer had left the
 * channel alone for less than twice the spin window before it sent this message (its gap stamp,
 * channel_gap()), i.e. it answers quickly once it has what it waits for. When it takes longer
 * (a model computing for milliseconds, a host between ticks), spinning only burns a CPU that
 * computing workers need. The rule counts no wake-up, of either side: on a VM a wake-up can
 * take hundreds of microseconds, and a rule that counts the time from the start of the wait
 * sees the other side's wake-up as a slow answer, so once both sides slept they would judge
 * each other slow and sleep again (tests/test_channel.py shows the case).
 *
 * SPIN_S (queue.h) is long enough to cover a round trip that includes one wake-up: with a
 * shorter spin, both sides fall into sleeping on every message, and each message then pays a
 * wake-up. It is short enough that a host waiting on a long call wastes little CPU.
 * Called with the GIL held; releases it to wait. */
PyObject *queue_pop_record(MappingObject *m, long long q, double timeout_s, double *spin_s) {
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
        /* Relaxed: where this side runs, a hint for the producer's spin (wait_for_change). */
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
PyObject *mapping_queue_pop(MappingObject *self, PyObject *args) {
    long long q;
    double timeout_s, spin_s;
    if (!PyArg_ParseTuple(args, "Ldd", &q, &timeout_s, &spin_s)) return NULL;
    PyObject *data = queue_pop_record(self, q, timeout_s, &spin_s);
    return data ? Py_BuildValue("(Nd)", data, spin_s) : NULL;
}

/* close(q): marks the queue closed and wakes both ends, whichever process calls it. */
/* Closing touches only the header's own words, so it works on a queue whose header the peer
 * wrote garbage into: closing is how a waiter on it is woken. */
PyObject *mapping_queue_close(MappingObject *self, PyObject *arg) {
    long long q = PyLong_AsLongLong(arg);
    if ((q == -1 && PyErr_Occurred()) || check_range(self, q, Q_DATA, LINE)) return NULL;
    char *hdr = self->base + q;
    /* SYNC POINT with the acquire loads of closed in wait_for_change() and queue_push_record(). */
    __atomic_store_n(u32_at(hdr, Q_CLOSED), 1, __ATOMIC_SEQ_CST);
    ring_bell(u32_at(hdr, Q_DATA_BELL), u32_at(hdr, Q_CONSUMER_SLEEPING));
    ring_bell(u32_at(hdr, Q_SPACE_BELL), u32_at(hdr, Q_PRODUCER_SLEEPING));
    Py_RETURN_NONE;
}

