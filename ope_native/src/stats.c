/* stats.c: CallStats, the counters a model's calls update (why in C: stats.h).
 *
 * The latencies of served calls go into a fixed window, the oldest overwritten first, so
 * counting a call never allocates.
 */
#include "stats.h"

#include "platform.h"

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

PyTypeObject CallStatsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ope_native.CallStats",
    .tp_basicsize = sizeof(CallStatsObject),
    .tp_dealloc = (destructor)callstats_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CallStats(window): a model's call counters, bytes copied, and last `window` latencies.",
    .tp_methods = callstats_methods,
    .tp_init = (initproc)callstats_init,
    .tp_new = PyType_GenericNew,
};
