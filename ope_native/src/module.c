/* module.c: the module ope_native._native, what Python sees of the layers below.
 *
 * The module's functions and types come from the files that implement them; this file only
 * lists them, readies the types, fills numpy's C API table for every file, and exports the
 * constants Python needs.
 */
#define OPE_IMPORTS_NUMPY /* this file defines numpy's API table (native.h) */
#include "native.h"

#include "calls.h"
#include "frames.h"
#include "mapping.h"
#include "memhook.h"
#include "platform.h"
#include "queue.h"
#include "stats.h"

static PyMethodDef module_methods[] = {
    {"pack_frame", pack_frame, METH_VARARGS,
     "pack_frame(kind, call_id, copied, entries) -> bytes: a tensor frame (ope/bridge/protocol.py)."},
    {"unpack_frame", unpack_frame, METH_O,
     "unpack_frame(data) -> (kind, call_id, copied, entries); ValueError if malformed."},
    {"encode_frame", (PyCFunction)(void (*)(void))encode_frame, METH_FASTCALL,
     "encode_frame(kind, call_id, tensors, own, in_place, codes, code_of, grow) -> (frame, copied, scratch, sealed) or None."},
    {"decode_frame", (PyCFunction)(void (*)(void))decode_frame, METH_FASTCALL,
     "decode_frame(data, host, peer_rings, dtypes, string_dtype, map_segment) -> (kind, call_id, copied, tensors)."},
    {"serve_calls", (PyCFunction)(void (*)(void))serve_calls, METH_FASTCALL,
     "serve_calls(mapping, in_q, out_q, spin_s, decoding, encoding, run, output_names, hook, idle_s, keep_bytes) -> (spin_s, data, call): the worker's loop for calls."},
    {"memhook_new", (PyCFunction)(void (*)(void))memhook_new, METH_FASTCALL,
     "memhook_new(own, threshold) -> capsule or None: numpy's handler putting arrays of threshold bytes or more in the own rings while a model runs."},
    {"memhook_counts", memhook_counts, METH_O,
     "memhook_counts(hook) -> (blocks alive, of which handed over, handed over in all)."},
    {"release_inputs", (PyCFunction)(void (*)(void))release_inputs_py, METH_FASTCALL,
     "release_inputs(scratch, sealed): give back a call's input copies and unseal the caller's arena arrays."},
    {"keep_kept_inputs", (PyCFunction)(void (*)(void))keep_kept_inputs_py, METH_FASTCALL,
     "keep_kept_inputs(arrays, peer_rings) -> count: private pages for inputs a model kept."},
    {"check_plain", (PyCFunction)(void (*)(void))check_plain, METH_FASTCALL,
     "check_plain(rows, values, sizes) -> {name: array} or None: ope.spec's success path."},
    {"exit_with_parent", exit_with_parent, METH_VARARGS,
     "exit_with_parent(pid, pipe_fd=-1): when parent `pid` is gone, or the pipe whose read end is `pipe_fd` reaches end of file, SIGKILL this process."},
    {NULL}};

/* ope_native.LAYOUT: layout.h's constants by name (read-only), for Python to read instead of
 * declaring them again. */
static PyObject *layout_constants(void) {
    PyObject *layout = PyDict_New();
#define LAYOUT_ITEM(name)                                                                       \
    if (layout) {                                                                               \
        PyObject *value = PyLong_FromUnsignedLongLong((unsigned long long)(name));              \
        if (!value || PyDict_SetItemString(layout, #name, value)) Py_CLEAR(layout);             \
        Py_XDECREF(value);                                                                      \
    }
    LAYOUT_CONSTANTS(LAYOUT_ITEM)
#undef LAYOUT_ITEM
    PyObject *proxy = layout ? PyDictProxy_New(layout) : NULL; /* read-only */
    Py_XDECREF(layout);
    return proxy;
}

/* ope_native.DTYPE_NAMES and DTYPE_ITEMSIZES: layout.h's DTYPE_TABLE, indexed by code. */
static PyObject *dtype_column(int names) {
    static const char *const name_of[] = {
#define DTYPE_NAME(id, name, itemsize) name,
        DTYPE_TABLE(DTYPE_NAME)
#undef DTYPE_NAME
    };
    PyObject *column = PyTuple_New(N_CODES);
    for (Py_ssize_t code = 0; column && code < N_CODES; code++) {
        PyObject *item = names ? PyUnicode_FromString(name_of[code])
                               : PyLong_FromUnsignedLong(CODE_ITEMSIZE[code]);
        if (!item) Py_CLEAR(column);
        else PyTuple_SET_ITEM(column, code, item);
    }
    return column;
}

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "ope_native._native", "Native core of ope's shared-memory bridge.", -1,
    module_methods};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&BlockType) < 0 ||
        PyType_Ready(&CallStatsType) < 0 || PyType_Ready(&SessionType) < 0)
        return NULL;
    import_array();
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Mapping", (PyObject *)&MappingType) ||
        PyModule_AddObjectRef(m, "Block", (PyObject *)&BlockType) ||
        PyModule_AddObjectRef(m, "CallStats", (PyObject *)&CallStatsType) ||
        PyModule_AddObjectRef(m, "Session", (PyObject *)&SessionType) ||
        PyModule_AddIntConstant(m, "LINE", LINE) ||
        PyModule_AddIntConstant(m, "RING_HEADER", RING_HEADER) ||
        PyModule_AddIntConstant(m, "BLOCK_HEADER", BLOCK_HEADER) ||
        PyModule_AddIntConstant(m, "QUEUE_HEADER", Q_DATA) ||
        PyModule_AddIntConstant(m, "CALL_ANSWERED", CALL_ANSWERED) ||
        PyModule_AddIntConstant(m, "CALL_SENT", CALL_SENT) ||
        PyModule_AddIntConstant(m, "CALL_NOT_SENT", CALL_NOT_SENT) ||
        PyModule_AddIntConstant(m, "CALL_NOT_PLAIN", CALL_NOT_PLAIN) ||
        PyModule_AddIntConstant(m, "CALL_UNCHECKED", CALL_UNCHECKED) ||
        PyModule_AddObject(m, "SPIN_S", PyFloat_FromDouble(SPIN_S)) ||
        PyModule_AddObject(m, "LAYOUT", layout_constants()) ||
        PyModule_AddObject(m, "DTYPE_NAMES", dtype_column(1)) ||
        PyModule_AddObject(m, "DTYPE_ITEMSIZES", dtype_column(0))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
