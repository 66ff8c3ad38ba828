/* frames.h: tensor frames, the binary messages of every call (layout: layout.h; described in
 * ope/bridge/protocol.py), and the codec that carries a call's tensors through the arena.
 *
 * frames.c reads and writes the format; codec.c puts tensors in the arena and names them in a
 * frame, and turns a frame back into views on the arena, one C call each way.
 */
#ifndef OPE_FRAMES_H
#define OPE_FRAMES_H

#include "mapping.h"

static inline void put_u16(char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put_u32(char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put_u64(char *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint16_t get_u16(const char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t get_u32(const char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get_u64(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* One entry's fields: what pack_frame() reads from Python, encode_frame() from an array,
 * and parse_entry() from a frame. */
typedef struct {
    const char *name;
    Py_ssize_t name_len;
    unsigned long long code, itemsize, seg, offset, nbytes;
    Py_ssize_t ndim;
    unsigned long long dims[FRAME_MAX_DIMS];
} Entry;

/* ---- the format (frames.c) ------------------------------------------------------------ */

/* Bytes per element of each dtype code (layout.h, DTYPE_TABLE). */
extern const uint32_t CODE_ITEMSIZE[N_CODES];
int frame_error(const char *what, Py_ssize_t at);
int entry_in_range(const Entry *e);
int check_frame_size(int kind, Py_ssize_t count);
/* The frame of `count` entries, as bytes. */
PyObject *write_frame(int kind, unsigned long long call_id, unsigned long long copied,
                      const Entry *e, Py_ssize_t count);
/* The header of a frame of `len` bytes, checked; returns its entry count, or -1. */
Py_ssize_t frame_count(const char *p, Py_ssize_t len);
int parse_entry(const char *base, Py_ssize_t *pos, Py_ssize_t len, Entry *e);
PyObject *entry_name(const Entry *e, Py_ssize_t at);
PyObject *pack_frame(PyObject *m, PyObject *args);
PyObject *unpack_frame(PyObject *m, PyObject *arg);

typedef struct Hook Hook; /* memhook.h */

/* ---- the codec (codec.c) -------------------------------------------------------------- */

/* A tensor encode_tensors() copied into the arena: its block in one of this side's rings, the
 * Mapping referenced until the block is given back or handed on. */
typedef struct {
    MappingObject *m;
    long long ring, payload;
} Copy;

/* What encode_tensors() made for one frame. The copies live in C, not in Python objects: on a
 * small call each object costs as much as the copying; a Python list of them is made only for
 * a caller that gives them back later (copies_list()). `copies` points at `few` or at memory
 * of its own, so an Encoded stays where it was declared. */
typedef struct {
    PyObject *frame;  /* bytes */
    PyObject *sealed; /* the caller's arena arrays it sealed (a list); NULL when not looking */
    unsigned long long copied;
    Py_ssize_t ncopies;
    Copy *copies, few[4];
} Encoded;

/* `adopt`: the worker's hook (memhook.h), whose blocks an output may already lie in, or NULL. */
int encode_tensors(int kind, unsigned long long call_id, PyObject *tensors, int owned,
                   PyObject *own, int look_in_arena, PyObject *codes, PyObject *code_of,
                   PyObject *grow, Hook *adopt, Encoded *out);
void encoded_clear(Encoded *e);
int encoded_release(Encoded *e);
void encoded_release_raising(Encoded *e);
PyObject *copies_list(const Encoded *e);
void release_raising(PyObject *scratch, PyObject *sealed);
/* The Block at the end of `array`'s chain of ndarray bases (borrowed), or NULL. */
BlockObject *block_under(PyArrayObject *array);

PyObject *encode_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *decode_frame(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *release_inputs_py(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);

#endif
