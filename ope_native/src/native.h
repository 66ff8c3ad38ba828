/* native.h: what every file of the extension includes first.
 *
 * ope_native does what Python cannot do for ope's shared-memory bridge, in layers: the
 * operating system (platform), shared-memory structures (mapping, ring, queue), the tensor
 * frame and its codec (frames, codec), and the per-call policy (calls, stats). The files share
 * one numpy API table, filled by module.c's import_array(), and the helpers below.
 *
 * Rules every file keeps: each atomic operation names the operation in the other process it
 * synchronises with (SYNC POINT). Offsets coming from Python are bounds-checked against the
 * mapping before any access; data the other process wrote (sizes, states, lengths) is
 * validated before it is trusted, and a violation raises ValueError (the host turns it into
 * ope.ProtocolError), never a crash.
 */
#ifndef OPE_NATIVE_H
#define OPE_NATIVE_H

#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL ope_native_ARRAY_API
#ifndef OPE_IMPORTS_NUMPY
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>
#include <stdint.h>
#include <string.h>

#include "layout.h"

static inline uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

static inline uint64_t *u64_at(char *base, uint64_t off) { return (uint64_t *)(base + off); }
static inline uint32_t *u32_at(char *base, uint64_t off) { return (uint32_t *)(base + off); }

/* pyutil.c */
PyObject *tuple_stealing(Py_ssize_t n, ...);
PyObject *take_exception(void);
void keep_first_error(PyObject **kept);
int raise_kept_error(PyObject **kept);

#endif
