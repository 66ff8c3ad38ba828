/* mapping.c: the Mapping and Block types.
 *
 * Every offset coming from Python is bounds-checked against the mapping before any access
 * (check_range()), and every atomic operation names the operation in the other process it
 * synchronises with. The Mapping's methods for rings and queues are theirs (ring.c, queue.c);
 * this file gathers them into the type.
 */
#include "mapping.h"

#include <errno.h>
#include <sys/mman.h>
#include <structmember.h>

#include "platform.h"
#include "queue.h"
#include "ring.h"

/* ---- Mapping ---------------------------------------------------------------------------- */

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

/* ---- Block ------------------------------------------------------------------------------ */

/* A Block viewing [off, off+nbytes) of `m`. With a ring (>= 0), the range must be a payload
 * of that ring, and if `release` the block is given back to the ring when the Block is
 * deallocated. */
PyObject *new_block(MappingObject *m, long long off, long long nbytes, long long ring, int release,
                    int sealed) {
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

PyTypeObject BlockType = {
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

/* ---- the Mapping type ---------------------------------------------------------------- */

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

PyTypeObject MappingType = {
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
