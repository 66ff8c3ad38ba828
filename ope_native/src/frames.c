/* frames.c: the tensor-frame format, written and read without the arena.
 *
 * A frame is a fixed header and one entry per tensor, all fields at fixed offsets (layout.h).
 * Everything the peer wrote is checked here before any of it is used: sizes, rank, codes,
 * lengths and the product of the shape; that a range names live memory is the ring's check
 * (new_block()). pack_frame and unpack_frame give tools and tests a frame's descriptors.
 */
#include "frames.h"

#include <limits.h>

const uint32_t CODE_ITEMSIZE[N_CODES] = {
#define DTYPE_ITEMSIZE(id, name, itemsize) itemsize,
    DTYPE_TABLE(DTYPE_ITEMSIZE)
#undef DTYPE_ITEMSIZE
};

static int itemsize_fits_code(uint64_t code, uint64_t itemsize) {
    if (code >= N_CODES) return 0;
    return code == STRING_CODE ? itemsize % 4 == 0 : itemsize == CODE_ITEMSIZE[code];
}

int frame_error(const char *what, Py_ssize_t at) {
    PyErr_Format(PyExc_ValueError, "tensor frame: %s (at byte %zd)", what, at);
    return -1;
}

int entry_in_range(const Entry *e) {
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
PyObject *write_frame(int kind, unsigned long long call_id, unsigned long long copied,
                      const Entry *e, Py_ssize_t count) {
    Py_ssize_t size = FRAME_HEADER;
    for (Py_ssize_t i = 0; i < count; i++)
        size += ENTRY_HEADER + 8 * e[i].ndim + (Py_ssize_t)round_up((uint64_t)e[i].name_len, 8);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) return NULL;
    char *p = PyBytes_AS_STRING(out);
    memset(p, 0, (size_t)size);
    p[F_MARKER] = (char)FRAME_MARKER;
    p[F_KIND] = (char)kind;
    put_u16(p + F_COUNT, (uint16_t)count);
    put_u64(p + F_CALL_ID, call_id);
    put_u64(p + F_COPIED, copied);
    p += FRAME_HEADER;
    for (Py_ssize_t i = 0; i < count; i++) {
        p[E_CODE] = (char)e[i].code;
        p[E_RANK] = (char)e[i].ndim;
        put_u16(p + E_NAME_LEN, (uint16_t)e[i].name_len);
        put_u32(p + E_ITEMSIZE, (uint32_t)e[i].itemsize);
        put_u64(p + E_SEG, e[i].seg);
        put_u64(p + E_OFFSET, e[i].offset);
        put_u64(p + E_NBYTES, e[i].nbytes);
        p += ENTRY_HEADER;
        for (Py_ssize_t d = 0; d < e[i].ndim; d++, p += 8) put_u64(p, e[i].dims[d]);
        memcpy(p, e[i].name, (size_t)e[i].name_len);
        p += round_up((uint64_t)e[i].name_len, 8);
    }
    return out;
}

int check_frame_size(int kind, Py_ssize_t count) {
    if (kind < 0 || kind > 255 || count > UINT16_MAX) {
        PyErr_SetString(PyExc_ValueError, "frame kind or tensor count out of range");
        return -1;
    }
    return 0;
}

/* pack_frame(kind, call_id, copied, entries) -> bytes. Each entry is
 * (name, dtype code, itemsize, shape tuple, segment id, payload offset, nbytes). */
PyObject *pack_frame(PyObject *m, PyObject *args) {
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
int parse_entry(const char *base, Py_ssize_t *pos, Py_ssize_t len, Entry *e) {
    const char *p = base + *pos;
    if (len - *pos < ENTRY_HEADER) return frame_error("entry header past the end", *pos);
    e->code = (uint8_t)p[E_CODE];
    e->ndim = (uint8_t)p[E_RANK];
    e->name_len = get_u16(p + E_NAME_LEN);
    e->itemsize = get_u32(p + E_ITEMSIZE);
    e->seg = get_u64(p + E_SEG);
    e->offset = get_u64(p + E_OFFSET);
    e->nbytes = get_u64(p + E_NBYTES);
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
        uint64_t dim = get_u64(p + E_SHAPE + 8 * d);
        overflow |= dim > (uint64_t)LLONG_MAX || (dim && __builtin_mul_overflow(extent, dim, &extent));
        elements *= dim; /* <= extent, or 0 */
        e->dims[d] = dim;
    }
    if (overflow || __builtin_mul_overflow(extent, e->itemsize ? e->itemsize : 1, &extent_bytes) ||
        extent_bytes > (uint64_t)LLONG_MAX || __builtin_mul_overflow(elements, e->itemsize, &total) ||
        total != e->nbytes)
        return frame_error("nbytes does not match shape and itemsize", *pos);
    e->name = p + E_SHAPE + 8 * e->ndim;
    *pos += (Py_ssize_t)need;
    return 0;
}

PyObject *entry_name(const Entry *e, Py_ssize_t at) {
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
Py_ssize_t frame_count(const char *p, Py_ssize_t len) {
    if (len < FRAME_HEADER || (uint8_t)p[F_MARKER] != FRAME_MARKER || get_u32(p + F_RESERVED) != 0)
        return frame_error("no frame header", 0);
    return get_u16(p + F_COUNT);
}

/* unpack_frame(data) -> (kind, call_id, copied, [entry, ...]); ValueError for anything that
 * is not a well-formed frame. */
PyObject *unpack_frame(PyObject *m, PyObject *arg) {
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
    result = Py_BuildValue("(iKKO)", (int)(uint8_t)p[F_KIND], (unsigned long long)get_u64(p + F_CALL_ID),
                           (unsigned long long)get_u64(p + F_COPIED), entries);
done:
    Py_XDECREF(entries);
    PyBuffer_Release(&view);
    return result;
}
