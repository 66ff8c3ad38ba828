/* calls.h: the per-call policy, each side's part of a call in one crossing into C (calls.c). */
#ifndef OPE_CALLS_H
#define OPE_CALLS_H

#include "native.h"

/* Session.call()'s outcomes */
enum { CALL_ANSWERED, CALL_SENT, CALL_NOT_SENT, CALL_NOT_PLAIN, CALL_UNCHECKED };

PyObject *check_plain(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *keep_kept_inputs_py(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *serve_calls(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
#include "mapping.h"
#include "stats.h"

typedef struct {
    PyObject_HEAD
    MappingObject *mapping;
    long long out_q, in_q;
    double spin_s;
    PyObject *encoding, *decoding, *checks;
    CallStatsObject *stats; /* NULL: not counted */
} SessionObject;

extern PyTypeObject SessionType;

#endif
