/* codec.c: a call's tensors into the arena and into a frame, and a frame back into views on
 * the arena, in one C call each way (ope.bridge.arena.Arena.encode/decode wrap them).
 *
 * What one call costs in Python objects is what a small call costs in time, so the copies a
 * frame names live in C structs and views are made through numpy's C API. An array that
 * already lies in the sender's own segment is named where it is, and sealed while in flight.
 */
#include "frames.h"

#include "memhook.h"
#include "ring.h"

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

/* A new block of `nbytes` in one of this side's own rings (`own`: (segment id, Mapping, ring
 * offset), the newest last and tried first), growing the arena through `grow(nbytes)`, which
 * returns the new segment's triple, when none has room. */
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
BlockObject *block_under(PyArrayObject *array) {
    PyObject *base = PyArray_BASE(array);
    while (base && PyArray_Check(base)) base = PyArray_BASE((PyArrayObject *)base);
    return base && Py_TYPE(base) == &BlockType ? (BlockObject *)base : NULL;
}

/* Where `array` already lies in one of this side's `own` segments: 1 and its segment id and
 * payload offset, else 0. An array from model.empty() (or a C-contiguous slice of one) is a
 * chain of ndarray views whose last base is a Block of one of this side's mappings. */
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
void release_raising(PyObject *scratch, PyObject *sealed) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (release_inputs(scratch, sealed)) PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* release_inputs(scratch, sealed), lists or tuples: see release_inputs(). */
PyObject *release_inputs_py(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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

/* Drops what `e` references; gives nothing back (the peer gives the blocks back, or a Python
 * list of them now holds them). */
void encoded_clear(Encoded *e) {
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
int encoded_release(Encoded *e) {
    PyObject *kept[3] = {NULL, NULL, NULL};
    for (Py_ssize_t i = 0; i < e->ncopies; i++)
        if (ring_release(e->copies[i].m, e->copies[i].ring, e->copies[i].payload))
            keep_first_error(kept);
    unseal(e->sealed);
    encoded_clear(e);
    return raise_kept_error(kept);
}

/* encoded_release() while an exception is being raised: that one stays the one raised. */
void encoded_release_raising(Encoded *e) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (encoded_release(e)) PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

/* The copies of `e` as a list of (Mapping, ring, payload), for release_inputs(); NULL on error. */
PyObject *copies_list(const Encoded *e) {
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
 * with `adopt`, when only the caller holds `tensors`, an array the model made in a block of
 * the hook's (memhook.c) that nothing else references is named where it is and handed over
 * to the peer once the frame is made;
 * every other one is copied into a new block of an own ring. `owned`: `tensors` is a dict that
 * only this call holds (plain_arrays() made it), iterated as it is; any other dict's items are
 * taken first, since callbacks (code_of, grow) and big copies (which let other threads run)
 * may see it change meanwhile. Returns 1 when encoded; 0, with nothing held, when a value is
 * not an ndarray or its dtype has no frame code (the caller's spec check then says what is
 * wrong); -1 with an exception set and nothing held. */
int encode_tensors(int kind, unsigned long long call_id, PyObject *tensors, int owned,
                   PyObject *own, int look_in_arena, PyObject *codes, PyObject *code_of,
                   PyObject *grow, Hook *adopt, Encoded *out) {
    *out = (Encoded){NULL, NULL, 0, 0, NULL, {{0}}};
    out->copies = out->few;
    PyObject *items = owned ? NULL : PyDict_Items(tensors);
    if (!owned && !items) return -1;
    Py_ssize_t count = owned ? PyDict_GET_SIZE(tensors) : PyList_GET_SIZE(items), pos = 0;
    if (check_frame_size(kind, count)) {
        Py_XDECREF(items);
        return -1;
    }
    if (Py_REFCNT(tensors) != 1) adopt = NULL; /* whoever else holds the dict holds its arrays */
    Entry stack[4], *e = count <= 4 ? stack : PyMem_Malloc(sizeof(Entry) * (size_t)count);
    void *born_stack[4], **born = count <= 4 ? born_stack : PyMem_Malloc(sizeof(void *) * (size_t)count);
    Py_ssize_t nborn = 0;
    PyObject *in_place = look_in_arena ? PyList_New(0) : NULL;
    if (count > 4) out->copies = PyMem_Malloc(sizeof(Copy) * (size_t)count);
    int status = -1;
    if (!e || !born || !out->copies || (look_in_arena && !in_place)) {
        if (!e || !born || !out->copies) PyErr_NoMemory();
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
        /* References: the dict's, and the items list's when this call took one. */
        found = hook_adoptable(adopt, a, owned ? 1 : 2, own, &x->seg, &x->offset);
        if (found < 0) goto fail;
        if (found) { /* born in our ring while the model ran: named where it is */
            born[nborn++] = PyArray_DATA(a);
            continue;
        }
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
    for (Py_ssize_t i = 0; i < nborn; i++) hook_hand_over(adopt, born[i]);
    goto done;
not_encodable:
    status = 0;
fail:
    /* Give back what this call allocated: the frame naming it is never sent. */
    encoded_release_raising(out);
done:
    if (e && e != stack) PyMem_Free(e);
    if (born && born != born_stack) PyMem_Free(born);
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
PyObject *encode_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
                                args[7], NULL, &enc);
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
PyObject *decode_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
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
        result = tuple_stealing(4, PyLong_FromLong((uint8_t)p[F_KIND]),
                                PyLong_FromUnsignedLongLong(get_u64(p + F_CALL_ID)),
                                PyLong_FromUnsignedLongLong(get_u64(p + F_COPIED)), tensors);
done_starts:
    if (start != starts) PyMem_Free(start);
done:
    if (e && e != stack) PyMem_Free(e);
    PyBuffer_Release(&view);
    return result;
}

