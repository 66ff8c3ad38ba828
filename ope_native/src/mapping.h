/* mapping.h: a shared-memory segment as Python sees it, and windows of it.
 *
 * A Mapping's lifetime is reference counted, so a numpy array viewing it stays valid after its
 * model is closed or its worker has died. A Block is a window of a Mapping exported through the
 * buffer protocol; one cut from a data ring gives its space back to the ring when the last view
 * of it is dropped.
 */
#ifndef OPE_MAPPING_H
#define OPE_MAPPING_H

#include "native.h"

typedef struct {
    PyObject_HEAD
    char *base;
    Py_ssize_t size;
    int private; /* copy-on-write: this process's writes never reach the segment */
    PyObject *weakrefs;
} MappingObject;

typedef struct {
    PyObject_HEAD
    MappingObject *mapping;
    Py_ssize_t offset, nbytes;
    long long ring; /* ring header offset, or -1: the block is not returned to a ring */
    int sealed;
    PyObject *weakrefs;
} BlockObject;

extern PyTypeObject MappingType;
extern PyTypeObject BlockType;

/* Checks that [off, off+len) lies inside the mapping and `off` is aligned to `align`. */
static inline int check_range(MappingObject *m, long long off, long long len, int align) {
    if (off < 0 || len < 0 || off > m->size || len > m->size - off || (off % align) != 0) {
        PyErr_Format(PyExc_ValueError,
                     "range [%lld, +%lld) (alignment %d) is outside the %zd-byte mapping", off, len,
                     align, m->size);
        return -1;
    }
    return 0;
}

/* A Block viewing [off, off+nbytes) of `m`: see mapping.c. */
PyObject *new_block(MappingObject *m, long long off, long long nbytes, long long ring, int release,
                    int sealed);

#endif
