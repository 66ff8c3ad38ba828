/* pyutil.c: small helpers over Python objects and errors that several layers share.
 *
 * A result tuple built without parsing a format string on every call, and an exception
 * carried past a failure (or into a result) to be reported later.
 */
#include "native.h"

#include <stdarg.h>

/* A new tuple of the `n` arguments, references it steals; NULL (having released the others)
 * if one of them is NULL or memory runs out. For the results of the per-call functions:
 * Py_BuildValue parses its format string on every call, a cost a small call notices. */
PyObject *tuple_stealing(Py_ssize_t n, ...) {
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

/* The exception being raised, normalised and with its traceback attached, as a new reference
 * (the error indicator is cleared): a value Python can format later. */
PyObject *take_exception(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* Keeps the error just raised aside in `kept` (type, value, traceback) if it is the first, for
 * loops that go on past a failure and report the first; clears it otherwise. */
void keep_first_error(PyObject **kept) {
    if (kept[0]) PyErr_Clear();
    else PyErr_Fetch(&kept[0], &kept[1], &kept[2]);
}

/* Raises the error keep_first_error() kept, if any: -1 then, else 0. */
int raise_kept_error(PyObject **kept) {
    PyErr_Restore(kept[0], kept[1], kept[2]);
    return kept[0] ? -1 : 0;
}

