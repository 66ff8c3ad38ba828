/* memhook.c: numpy arrays born in the worker's data ring while its model runs.
 *
 * A numpy memory handler (PyDataMem_SetHandler, numpy >= 1.22) installed in the worker's
 * thread while its loop serves calls, and active only while the model runs: data of
 * `threshold` bytes or more is cut from one of the worker's own rings when one has room, so
 * an output the model returns already
 * lies in the arena and its RESULT names it in place. The call's temporaries live there too,
 * and their blocks are reused by the next call. The arena grows only for copies, as before
 * (by at least what it holds), so after a first copy the same outputs find room. Everything
 * else, and anything not clearly ours (another thread, no GIL, a full ring, the handler
 * outside a call), goes to malloc.
 *
 * Ownership: the hook records each block it cut (its pointer, Mapping, ring). numpy calls
 * the handler's free when the array owning the data dies, at any time, in any thread, maybe
 * long after the call: a recorded block goes back to its ring, anything else to free(). A
 * block the RESULT names is handed over first: the host gives it back when the caller drops
 * the output, and the array's free only forgets the record. Only an array that nothing but
 * the outputs dict references is handed over; one the model kept (or a view of it) is copied
 * as before, and its block stays the model's until freed.
 */
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION /* the handler API; checked at run time */
#include "memhook.h"

#include <pthread.h>

#include "ring.h"

typedef struct {
    char *ptr;
    MappingObject *m; /* referenced while the record lives: the bytes stay mapped */
    long long ring;
    size_t nbytes;
    int handed;
} Born;

struct Hook {
    PyObject *own; /* the arena's own rings: [(segment id, Mapping, ring offset)] */
    size_t threshold;
    int active;
    pthread_t thread;
    pthread_mutex_t lock; /* the records: free() may come from any thread */
    Born *born;
    Py_ssize_t n, cap, handed_total;
};

#define CAPSULE_NAME "mem_handler"

static Py_ssize_t find_born(Hook *h, void *ptr) {
    for (Py_ssize_t i = h->n - 1; i >= 0; i--)
        if (h->born[i].ptr == ptr) return i;
    return -1;
}

/* A block of `size` from `t`, an own ring's (segment id, Mapping, ring offset), recorded;
 * NULL when it has no room. Called with the lock held. */
static char *cut_from(Hook *h, PyObject *t, size_t size) {
    if (h->n == h->cap) {
        Py_ssize_t cap = h->cap ? 2 * h->cap : 16;
        Born *grown = realloc(h->born, sizeof(Born) * (size_t)cap);
        if (!grown) return NULL;
        h->born = grown;
        h->cap = cap;
    }
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3 ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(t, 1), &MappingType))
        return NULL;
    MappingObject *m = (MappingObject *)PyTuple_GET_ITEM(t, 1);
    long long ring = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
    long long payload = ring < 0 ? -2 : ring_alloc(m, ring, (uint64_t)size);
    if (payload < 0) {
        PyErr_Clear();
        return NULL;
    }
    char *ptr = m->base + payload;
    h->born[h->n++] = (Born){ptr, (MappingObject *)Py_NewRef(m), ring, size, 0};
    return ptr;
}

/* A block from the newest own ring with room, recorded; NULL when the call is not clearly
 * ours or no ring has room. It never grows the arena: what the model allocates beyond the
 * arena's room stays private memory, counted by the worker's memory limit. Runs with the
 * GIL held (checked). */
static void *arena_alloc(Hook *h, size_t size) {
    if (!h->active || size < h->threshold || !pthread_equal(pthread_self(), h->thread) ||
        !PyGILState_Check())
        return NULL;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb); /* numpy may allocate while an error is set */
    char *ptr = NULL;
    pthread_mutex_lock(&h->lock);
    for (Py_ssize_t i = PyList_GET_SIZE(h->own) - 1; i >= 0 && !ptr; i--)
        ptr = cut_from(h, PyList_GET_ITEM(h->own, i), size);
    pthread_mutex_unlock(&h->lock);
    PyErr_Restore(type, value, tb);
    return ptr;
}

/* Forgets the record of `ptr` and gives its block back unless handed over; 0 if `ptr` is
 * not a block of ours. */
static int arena_free(Hook *h, void *ptr) {
    /* No record: not ours (records are added by the serving thread, never for this ptr). */
    if (!__atomic_load_n(&h->n, __ATOMIC_RELAXED)) return 0;
    pthread_mutex_lock(&h->lock);
    Py_ssize_t i = h->n ? find_born(h, ptr) : -1;
    Born b = {0};
    if (i >= 0) {
        b = h->born[i];
        h->born[i] = h->born[--h->n];
    }
    pthread_mutex_unlock(&h->lock);
    if (i < 0) return 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    /* A refusal means a corrupt ring; the block is lost either way, never freed twice. */
    if (!b.handed && ring_release(b.m, b.ring, b.ptr - b.m->base)) PyErr_Clear();
    Py_DECREF(b.m);
    PyErr_Restore(type, value, tb);
    PyGILState_Release(gil);
    return 1;
}

static void *hook_malloc(void *ctx, size_t size) {
    void *p = arena_alloc(ctx, size);
    return p ? p : malloc(size);
}

static void *hook_calloc(void *ctx, size_t nelem, size_t elsize) {
    if (elsize && nelem > SIZE_MAX / elsize) return NULL;
    void *p = arena_alloc(ctx, nelem * elsize);
    if (p) return memset(p, 0, nelem * elsize); /* blocks are reused: not zero */
    return calloc(nelem, elsize);
}

static void *hook_realloc(void *ctx, void *ptr, size_t size) {
    Hook *h = ctx;
    size_t old = 0;
    pthread_mutex_lock(&h->lock);
    Py_ssize_t i = ptr && h->n ? find_born(h, ptr) : -1;
    if (i >= 0) old = h->born[i].nbytes;
    pthread_mutex_unlock(&h->lock);
    if (i < 0) return realloc(ptr, size);
    void *p = hook_malloc(ctx, size ? size : 1);
    if (!p) return NULL;
    memcpy(p, ptr, old < size ? old : size);
    arena_free(h, ptr);
    return p;
}

static void hook_free(void *ctx, void *ptr, size_t size) {
    (void)size;
    if (ptr && !arena_free(ctx, ptr)) free(ptr);
}

Hook *hook_of(PyObject *capsule) {
    if (capsule == Py_None || !PyCapsule_IsValid(capsule, CAPSULE_NAME)) return NULL;
    return ((PyDataMem_Handler *)PyCapsule_GetPointer(capsule, CAPSULE_NAME))->allocator.ctx;
}

PyObject *hook_install(Hook *h, PyObject *capsule) {
    PyObject *previous = PyDataMem_SetHandler(capsule);
    if (previous) h->thread = pthread_self();
    return previous;
}

void hook_activate(Hook *h, int active) { h->active = active; }

int hook_uninstall(Hook *h, PyObject *previous) {
    h->active = 0;
    PyObject *ours = PyDataMem_SetHandler(previous);
    Py_DECREF(previous);
    Py_XDECREF(ours);
    return ours ? 0 : -1;
}

int hook_adoptable(Hook *h, PyArrayObject *a, Py_ssize_t refs, PyObject *own,
                   unsigned long long *seg, unsigned long long *offset) {
    /* Smaller than the threshold: never cut from a ring, so the common small output of the
     * hot path is told apart without taking the lock (at worst a copy, never a wrong name). */
    if (!h || (size_t)PyArray_NBYTES(a) < h->threshold || Py_REFCNT(a) != refs ||
        !PyArray_CHKFLAGS(a, NPY_ARRAY_OWNDATA) || !PyArray_IS_C_CONTIGUOUS(a) || PyArray_BASE(a))
        return 0;
    pthread_mutex_lock(&h->lock);
    Py_ssize_t i = h->n ? find_born(h, PyArray_DATA(a)) : -1;
    MappingObject *m = i >= 0 && !h->born[i].handed && (size_t)PyArray_NBYTES(a) <= h->born[i].nbytes
                           ? h->born[i].m : NULL;
    pthread_mutex_unlock(&h->lock);
    for (Py_ssize_t j = 0; m && j < PyList_GET_SIZE(own); j++) {
        PyObject *t = PyList_GET_ITEM(own, j);
        if (PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 3 && PyTuple_GET_ITEM(t, 1) == (PyObject *)m) {
            *seg = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 0));
            *offset = (unsigned long long)((char *)PyArray_DATA(a) - m->base);
            return PyErr_Occurred() ? -1 : 1;
        }
    }
    return 0;
}

void hook_hand_over(Hook *h, void *data) {
    pthread_mutex_lock(&h->lock);
    Py_ssize_t i = find_born(h, data);
    if (i >= 0) {
        h->born[i].handed = 1;
        h->handed_total++;
    }
    pthread_mutex_unlock(&h->lock);
}

/* memhook_new(own, threshold) -> capsule, or None when numpy has no handler API (< 1.22).
 * The hook lives as long as the process: arrays it allocated call it until they die. */
PyObject *memhook_new(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "memhook_new(own rings list, threshold)");
        return NULL;
    }
    Py_ssize_t threshold = PyLong_AsSsize_t(args[1]);
    if (threshold == -1 && PyErr_Occurred()) return NULL;
    if (PyArray_GetNDArrayCFeatureVersion() < NPY_1_22_API_VERSION) Py_RETURN_NONE;
    PyDataMem_Handler *handler = calloc(1, sizeof(PyDataMem_Handler));
    Hook *h = calloc(1, sizeof(Hook));
    if (!handler || !h) {
        free(handler);
        free(h);
        return PyErr_NoMemory();
    }
    h->own = Py_NewRef(args[0]);
    h->threshold = threshold > 0 ? (size_t)threshold : 1;
    pthread_mutex_init(&h->lock, NULL);
    snprintf(handler->name, sizeof(handler->name), "ope_arena");
    handler->version = 1;
    handler->allocator = (PyDataMemAllocator){h, hook_malloc, hook_calloc, hook_realloc, hook_free};
    return PyCapsule_New(handler, CAPSULE_NAME, NULL);
}

/* memhook_counts(capsule) -> (blocks alive, of which handed over, handed over in all). */
PyObject *memhook_counts(PyObject *mod, PyObject *capsule) {
    Hook *h = hook_of(capsule);
    if (!h) {
        PyErr_SetString(PyExc_TypeError, "memhook_counts takes a capsule from memhook_new");
        return NULL;
    }
    pthread_mutex_lock(&h->lock);
    Py_ssize_t handed = 0;
    for (Py_ssize_t i = 0; i < h->n; i++) handed += h->born[i].handed;
    PyObject *r = Py_BuildValue("(nnn)", h->n, handed, h->handed_total);
    pthread_mutex_unlock(&h->lock);
    return r;
}
