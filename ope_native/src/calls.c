/* calls.c: a call, on each side, in one crossing into C.
 *
 * Per-call Python costs more than all the copying of a small call, so the host's lone call
 * (call_alone: checks, exchange, checks) and the worker's loop (serve_calls) each run a whole
 * call here, with the success path of ope/spec.py's checks (check_plain); whatever is not the
 * plain case is handed back to Python, which holds the rules and words the errors.
 */
#include "calls.h"

#include <stddef.h>
#include <structmember.h>
#include <unistd.h>

#include "frames.h"
#include "memhook.h"
#include "queue.h"
#include "stats.h"

/* ---- spec checks: the success path (the rules: ope/spec.py) -------------------------- */

/* 1 if `value` passes `row` = (name, exact type, dtype, rank, ((dim, size), ...),
 * ((dim, symbol), ...)) with symbol sizes in `sizes` (bound here as they are first seen),
 * 0 if not, -1 on error. */
static int passes(PyObject *row, PyObject *value, PyObject *sizes) {
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 6) {
        PyErr_SetString(PyExc_TypeError, "a check row is a 6-tuple");
        return -1;
    }
    /* Exactly the row's type, which is numpy.ndarray whenever it can match. */
    if ((PyObject *)Py_TYPE(value) != PyTuple_GET_ITEM(row, 1) || !PyArray_Check(value)) return 0;
    PyArrayObject *array = (PyArrayObject *)value;
    if ((PyObject *)PyArray_DESCR(array) != PyTuple_GET_ITEM(row, 2)) return 0;
    Py_ssize_t rank = PyLong_AsSsize_t(PyTuple_GET_ITEM(row, 3));
    if (rank == -1 && PyErr_Occurred()) return -1;
    if (PyArray_NDIM(array) != rank) return 0;
    npy_intp *dims = PyArray_DIMS(array);
    PyObject *fixed = PyTuple_GET_ITEM(row, 4), *symbols = PyTuple_GET_ITEM(row, 5);
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(fixed); k++) {
        PyObject *pair = PyTuple_GET_ITEM(fixed, k);
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0)),
                   size = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
        if (PyErr_Occurred()) {
            /* A spec may fix a dim past any array's size: no array passes it. */
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            return 0;
        }
        if (index < 0 || index >= rank || dims[index] != size) return 0;
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(symbols); k++) {
        PyObject *pair = PyTuple_GET_ITEM(symbols, k), *symbol = PyTuple_GET_ITEM(pair, 1);
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0));
        if (index == -1 && PyErr_Occurred()) return -1;
        if (index < 0 || index >= rank) return 0;
        PyObject *bound = PyDict_GetItemWithError(sizes, symbol);
        if (bound) {
            Py_ssize_t size = PyLong_AsSsize_t(bound);
            if (size == -1 && PyErr_Occurred()) return -1;
            if (size != dims[index]) return 0;
            continue;
        }
        if (PyErr_Occurred()) return -1;
        PyObject *size = PyLong_FromSsize_t(dims[index]);
        int failed = !size || PyDict_SetItem(sizes, symbol, size);
        Py_XDECREF(size);
        if (failed) return -1;
    }
    return 1;
}

/* check_plain(rows, values, sizes) -> {name: array}, or None (plain_arrays() in C)
 * The success path of ope.spec's check loop in one call: `values` is a dict holding, for
 * each row, a value of exactly the row's type (plain ndarrays) with the row's dtype object,
 * rank, fixed dims and symbol sizes. None as soon as anything else is seen: the Python loop
 * then converts what it may and words the error. */
static PyObject *plain_arrays(PyObject *rows, PyObject *values, PyObject *sizes) {
    if (!PyDict_CheckExact(values) || PyDict_GET_SIZE(values) != PyTuple_GET_SIZE(rows))
        Py_RETURN_NONE;
    PyObject *arrays = PyDict_New();
    for (Py_ssize_t i = 0; arrays && i < PyTuple_GET_SIZE(rows); i++) {
        PyObject *row = PyTuple_GET_ITEM(rows, i), *name = PyTuple_GetItem(row, 0);
        PyObject *value = name ? PyDict_GetItemWithError(values, name) : NULL;
        int ok = value ? passes(row, value, sizes) : PyErr_Occurred() ? -1 : 0;
        if (ok > 0 && PyDict_SetItem(arrays, name, value)) ok = -1;
        if (ok < 0) Py_CLEAR(arrays);
        if (ok == 0) {
            Py_DECREF(arrays);
            Py_RETURN_NONE;
        }
    }
    return arrays;
}

PyObject *check_plain(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "check_plain(rows: tuple, values, sizes: dict)");
        return NULL;
    }
    return plain_arrays(args[0], args[1], args[2]);
}

/* ---- inputs a model keeps past its call ------------------------------------------------ */

/* The worker maps the host's segments copy-on-write (ope/bridge/arena.py), and the host reuses an
 * input's block as soon as the call is answered. A model that keeps an input, or a view or
 * tensor over it, would see the next call's bytes appear in it. So before a call is answered,
 * every input referenced beyond the call's own dict gets a private copy of its pages (each
 * page written once with the byte already there), and its segment's mapping leaves `rings`:
 * later frames map the segment afresh (decode_frame's map_segment), while what the model kept
 * goes on reading its frozen copy. */

static void copy_pages_privately(char *start, Py_ssize_t nbytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    char *end = start + nbytes;
    for (volatile char *p = start; p < end; p = (char *)(((uintptr_t)p / page + 1) * page)) {
        char byte = *p;
        *p = byte;
    }
}

/* Removes from `rings` (segment id -> (Mapping, ring offset)) the entries of mapping `m`. */
static int forget_mapping(PyObject *rings, MappingObject *m) {
    PyObject *stale = PyList_New(0), *key, *value;
    Py_ssize_t pos = 0;
    while (stale && PyDict_Next(rings, &pos, &key, &value))
        if (PyTuple_Check(value) && PyTuple_GET_SIZE(value) > 0 &&
            PyTuple_GET_ITEM(value, 0) == (PyObject *)m && PyList_Append(stale, key))
            Py_CLEAR(stale);
    for (Py_ssize_t i = 0; stale && i < PyList_GET_SIZE(stale); i++)
        if (PyDict_DelItem(rings, PyList_GET_ITEM(stale, i))) Py_CLEAR(stale);
    Py_XDECREF(stale);
    return stale ? 0 : -1;
}

/* The inputs in `arrays` (name -> array) that something besides the dict still holds get
 * private pages, and their mappings leave `rings`. Returns how many, or -1 on error. */
static Py_ssize_t keep_kept_inputs(PyObject *arrays, PyObject *rings) {
    Py_ssize_t pos = 0, kept = 0;
    PyObject *name, *value;
    while (PyDict_Next(arrays, &pos, &name, &value)) {
        BlockObject *b = PyArray_Check(value) ? block_under((PyArrayObject *)value) : NULL;
        if (!b || !b->mapping->private || (Py_REFCNT(value) == 1 && Py_REFCNT(b) == 1)) continue;
        copy_pages_privately(b->mapping->base + b->offset, b->nbytes);
        if (forget_mapping(rings, b->mapping)) return -1;
        kept++;
    }
    return kept;
}

/* keep_kept_inputs(arrays, rings) -> count: see keep_kept_inputs(). */
PyObject *keep_kept_inputs_py(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "keep_kept_inputs(arrays, rings) takes two dicts");
        return NULL;
    }
    Py_ssize_t kept = keep_kept_inputs(args[0], args[1]);
    return kept < 0 ? NULL : PyLong_FromSsize_t(kept);
}

/* ---- the worker's loop for calls ------------------------------------------------------- */

/* Whether `outputs` is a dict whose keys are exactly the set `names`. */
static int has_exactly(PyObject *outputs, PyObject *names) {
    if (!PyDict_CheckExact(outputs) || PyDict_GET_SIZE(outputs) != PySet_GET_SIZE(names)) return 0;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(outputs, &pos, &key, &value)) {
        int in = PySet_Contains(names, key);
        if (in != 1) {
            PyErr_Clear(); /* an unhashable key: Python's check words it */
            return 0;
        }
    }
    return 1;
}

/* run(arrays) with the `hook` (a capsule from memhook_new(), or None; serve_calls()
 * installed it) active: large arrays the model makes are born in the worker's ring. */
static PyObject *run_model(PyObject *run, PyObject *arrays, PyObject *hook) {
    Hook *h = hook_of(hook);
    if (h) hook_activate(h, 1);
    PyObject *outputs = PyObject_CallOneArg(run, arrays);
    if (h) hook_activate(h, 0);
    return outputs;
}

/* Runs one INFER the loop decoded: the model, then its RESULT frame into the queue. Returns 1
 * when answered, 0 when the queue closed, -1 with an exception set, or 2 with `*left` set to
 * the (call_id, arrays, outputs, exception) that Python must answer: the model raised, or its
 * outputs are not a dict of the spec's names that a frame carries as they are. */
static int answer_call(PyObject *message, PyObject *run, PyObject *names, PyObject *const *encoding,
                       PyObject *hook, PyObject *rings, MappingObject *m, long long out_q,
                       long long in_q, double spin_s, PyObject **left) {
    PyObject *call_id = PyTuple_GET_ITEM(message, 1), *arrays = PyTuple_GET_ITEM(message, 3);
    PyObject *outputs = run_model(run, arrays, hook), *error = NULL;
    unsigned long long id = PyLong_AsUnsignedLongLong(call_id); /* decode_frame made it from a u64 */
    Encoded e;
    int encoded = outputs && has_exactly(outputs, names)
        ? encode_tensors(MSG_RESULT, id, outputs, 0, encoding[0], 0, encoding[1], encoding[2],
                         encoding[3], hook_of(hook), &e)
        : 0;
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* KeyboardInterrupt, SystemExit */
            Py_XDECREF(outputs);
            return -1;
        }
        error = take_exception();
    }
    if (encoded > 0) { /* the host gives the outputs' blocks back as it drops its views */
        Py_CLEAR(outputs); /* an output may be an input: only what the model kept counts */
        if (keep_kept_inputs(arrays, rings) < 0) {
            encoded_release_raising(&e);
            return -1;
        }
        int pushed = queue_push_record(m, out_q, PyBytes_AS_STRING(e.frame), PyBytes_GET_SIZE(e.frame),
                                       -1.0, spin_s, in_q);
        encoded_clear(&e);
        return pushed;
    }
    *left = Py_BuildValue("(OONN)", call_id, arrays, outputs ? outputs : Py_NewRef(Py_None),
                          error ? error : Py_NewRef(Py_None));
    return *left ? 2 : -1;
}

/* Whether the worker holds segments it might give back: own segments of more than
 * `keep_bytes` in all, or more than one of the host's mapped. */
static int may_shrink(PyObject *own, PyObject *rings, long long keep_bytes) {
    long long owned = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(own); i++) {
        PyObject *t = PyList_GET_ITEM(own, i);
        if (PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 3 &&
            PyObject_TypeCheck(PyTuple_GET_ITEM(t, 1), &MappingType))
            owned += ((MappingObject *)PyTuple_GET_ITEM(t, 1))->size;
    }
    return owned > keep_bytes || PyDict_GET_SIZE(rings) > 1;
}

/* serve_calls(mapping, in_q, out_q, spin_s, decoding, encoding, run, output_names, hook, idle_s,
 *             keep_bytes) -> (spin_s, data, call)
 * The worker's loop while calls come (workers/worker.py): it pops each message, and while it
 * is an INFER frame, decodes it (decode_frame with the `decoding` arguments after data), runs
 * `run(arrays)`, encodes the outputs (encode_frame with the `encoding` arguments: own, codes,
 * code_of, grow; outputs born in the ring under `hook` named in place, see run_model()) and
 * pushes the RESULT, with no Python of its own in between. It returns, with
 * the spin to use next, what it leaves to Python: data None once the queue closed; any other
 * message, or a frame that does not decode, as `data` with call None; data None as well
 * when no message came for `idle_s` and the queue is open, which it waits for only while the
 * worker may give segments back (may_shrink()), else it waits for ever; or an INFER it ran but
 * could not answer as `call` (see answer_call()). */
static PyObject *serve_loop(PyObject *const *args);

/* The hook (numpy's handler) stays installed while the loop runs, so a call pays only for
 * activating it (run_model()). */
PyObject *serve_calls(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11 || !PyObject_TypeCheck(args[0], &MappingType) || !PyTuple_Check(args[4]) ||
        PyTuple_GET_SIZE(args[4]) != 5 || !PyTuple_Check(args[5]) || PyTuple_GET_SIZE(args[5]) != 4 ||
        !PyAnySet_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "serve_calls(mapping, in_q, out_q, spin_s, "
                                         "(5 decoding args), (4 encoding args), run, "
                                         "output_names, hook, idle_s, keep_bytes)");
        return NULL;
    }
    if (!PyList_Check(PyTuple_GET_ITEM(args[5], 0)) || !PyDict_Check(PyTuple_GET_ITEM(args[4], 1))) {
        PyErr_SetString(PyExc_TypeError, "serve_calls: own rings are a list, peer rings a dict");
        return NULL;
    }
    Hook *h = hook_of(args[8]);
    PyObject *previous = h ? hook_install(h, args[8]) : NULL;
    if (h && !previous) return NULL;
    PyObject *result = serve_loop(args);
    if (!h) return result;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb); /* the loop's error, if any, stays the one raised */
    if (hook_uninstall(h, previous)) {
        Py_CLEAR(result);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return NULL;
    }
    PyErr_Restore(type, value, tb);
    return result;
}

static PyObject *serve_loop(PyObject *const *args) {
    MappingObject *m = (MappingObject *)args[0];
    long long in_q = PyLong_AsLongLong(args[1]), out_q = PyLong_AsLongLong(args[2]);
    double spin_s = PyFloat_AsDouble(args[3]), idle_s = PyFloat_AsDouble(args[9]);
    long long keep_bytes = PyLong_AsLongLong(args[10]);
    if (PyErr_Occurred()) return NULL;
    PyObject *decode_args[6];
    for (int i = 0; i < 5; i++) decode_args[i + 1] = PyTuple_GET_ITEM(args[4], i);
    for (;;) {
        double wait_s =
            may_shrink(PyTuple_GET_ITEM(args[5], 0), decode_args[2], keep_bytes) ? idle_s : -1.0;
        PyObject *data = queue_pop_record(m, in_q, wait_s, &spin_s), *message = NULL, *call = NULL;
        if (!data) return NULL;
        if (data != Py_None && PyBytes_GET_SIZE(data) >= FRAME_HEADER &&
            (uint8_t)PyBytes_AS_STRING(data)[F_MARKER] == FRAME_MARKER &&
            PyBytes_AS_STRING(data)[F_KIND] == MSG_INFER) {
            decode_args[0] = data;
            message = decode_frame(NULL, decode_args, 6);
            if (!message && PyErr_ExceptionMatches(PyExc_Exception))
                PyErr_Clear(); /* Python decodes it again, and words the ProtocolError */
            else if (!message) {
                Py_DECREF(data);
                return NULL;
            }
        }
        if (!message) return Py_BuildValue("(dNO)", spin_s, data, Py_None);
        int answered = answer_call(message, args[6], args[7], &PyTuple_GET_ITEM(args[5], 0),
                                   args[8], decode_args[2], m, out_q, in_q, spin_s, &call);
        Py_DECREF(message);
        if (answered == 1) {
            Py_DECREF(data);
            continue;
        }
        if (answered == 0) Py_SETREF(data, Py_NewRef(Py_None));
        if (answered < 0) {
            Py_DECREF(data);
            return NULL;
        }
        return Py_BuildValue("(dNN)", spin_s, data, call ? call : Py_NewRef(Py_None));
    }
}

/* ---- the host's call with no other in flight ------------------------------------------ */

/* Whether `reply` is the RESULT frame of call `call_id`. */
static int is_result_of(PyObject *reply, unsigned long long call_id) {
    const char *p = PyBytes_AS_STRING(reply);
    return PyBytes_GET_SIZE(reply) >= FRAME_HEADER && (uint8_t)p[F_MARKER] == FRAME_MARKER &&
           p[F_KIND] == MSG_RESULT && get_u64(p + F_CALL_ID) == call_id;
}

/* The outputs of `reply`, this call's RESULT frame, decoded (decode_frame with the `decoding`
 * arguments); *copied_out gets the bytes the worker copied for them. With `out_rows` (not None),
 * *checked says whether the outputs pass them as they are, symbols bound as in `bindings`;
 * those that pass come in the rows' order (plain_arrays()). NULL with no error set if the
 * frame did not decode (or memory ran out): Python decodes it again and words the
 * ProtocolError (or raises). NULL with an error set on an interrupt. */
static PyObject *decode_result(PyObject *reply, PyObject *decoding, PyObject *out_rows,
                               PyObject *bindings, unsigned long long *copied_out, int *checked) {
    PyObject *decode_args[6] = {reply}, *message, *outputs = NULL;
    for (int i = 0; i < 5; i++) decode_args[i + 1] = PyTuple_GET_ITEM(decoding, i);
    *checked = 0;
    message = decode_frame(NULL, decode_args, 6);
    if (message) {
        outputs = Py_NewRef(PyTuple_GET_ITEM(message, 3));
        *copied_out = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(message, 2)); /* a u64 */
        Py_DECREF(message);
        if (out_rows != Py_None) {
            PyObject *sizes = PyDict_Copy(bindings),
                     *arrays = sizes ? plain_arrays(out_rows, outputs, sizes) : NULL;
            Py_XDECREF(sizes);
            if (arrays && arrays != Py_None) {
                *checked = 1;
                Py_SETREF(outputs, arrays);
            } else {
                Py_XDECREF(arrays);
                PyErr_Clear(); /* out of memory: Python's check meets it again, and raises */
            }
        }
    }
    if (!outputs && PyErr_ExceptionMatches(PyExc_Exception)) PyErr_Clear();
    return outputs;
}

/* The inputs to send: `tensors` as they are without `checks`; with them, `tensors` if they
 * pass the input rows as they are (plain_arrays(), *bindings getting the sizes of the
 * symbols), else None. NULL on error. */
static PyObject *checked_inputs(PyObject *tensors, PyObject *checks, PyObject **bindings) {
    if (checks == Py_None) {
        *bindings = Py_NewRef(Py_None);
        return Py_NewRef(tensors);
    }
    *bindings = PyDict_New();
    if (!*bindings) return NULL;
    PyObject *arrays = plain_arrays(PyTuple_GET_ITEM(checks, 0), tensors, *bindings);
    if (!arrays) Py_CLEAR(*bindings);
    return arrays;
}

/* Session.call(call_id, tensors, check) -> (outcome, reply, held, bindings)
 * The host's side of a call with no other in flight (ope/host/out_of_process.py, _call_alone), in one call.
 * `checks` (the session's with `check`, else None) is None when `tensors` are inputs already checked by ope/spec.py, or (input rows,
 * output rows) when they are the caller's: then this is all of a lone infer, the spec's
 * success path included (plain_arrays()), and `bindings` the sizes of the symbols. It puts the
 * inputs in the arena and seals the caller's arena arrays (encode_tensors() with the `encoding`
 * arguments, in place where they already lie there), pushes the INFER frame on `out_q`, and
 * waits for the answer on `in_q` within one spin window; the session's spin becomes the one
 * for the next wait (queue_pop_record()). `stats` (the model's CallStats, or NULL) counts the
 * bytes copied in, and those of the outputs of a RESULT decoded here.
 *   CALL_ANSWERED: the answer was this call's RESULT, it decoded, and with `checks` its
 *     outputs passed them (decode_result()); the inputs are released, `reply` is the outputs
 *     by name, `held` None.
 *   CALL_UNCHECKED: the same, with outputs that do not pass the output rows as they are:
 *     Python checks them, and converts them or words the error.
 *   CALL_SENT: anything else, left to Python: `reply` is the message's bytes, None if none
 *     came within the window, or the exception receiving raised; `held` is (scratch, sealed),
 *     the inputs the call still holds (see release_inputs()).
 *   CALL_NOT_SENT: the queue was closed (`reply` None) or sending raised (`reply` the
 *     exception); the inputs are released.
 *   CALL_NOT_PLAIN: an input does not pass the input rows as it is; nothing was sent, and
 *     Python checks the inputs (converts them or words the error).
 * Raises, holding nothing, when the inputs did not encode (nothing was sent), when giving back
 * the inputs failed (a corrupt ring) or when out of memory. */
static PyObject *lone_call(SessionObject *self, unsigned long long call_id, PyObject *tensors_in,
                           PyObject *checks) {
    CallStatsObject *stats = self->stats;
    MappingObject *m = self->mapping;
    long long out_q = self->out_q, in_q = self->in_q;
    PyObject *out_rows = checks == Py_None ? Py_None : PyTuple_GET_ITEM(checks, 1), *bindings;
    PyObject *tensors = checked_inputs(tensors_in, checks, &bindings);
    if (!tensors) return NULL;
    if (tensors == Py_None) {
        Py_DECREF(tensors);
        Py_DECREF(bindings);
        return Py_BuildValue("(iOOO)", CALL_NOT_PLAIN, Py_None, Py_None, Py_None);
    }
    PyObject *const *enc = &PyTuple_GET_ITEM(self->encoding, 0);
    Encoded e;
    int status = encode_tensors(MSG_INFER, call_id, tensors, checks != Py_None, enc[0], 1, enc[1],
                                enc[2], enc[3], NULL, &e);
    Py_DECREF(tensors);
    if (status == 0) PyErr_SetString(PyExc_TypeError, "Session.call: an input is not an array a frame carries");
    if (status <= 0) {
        Py_DECREF(bindings);
        return NULL;
    }
    if (stats) stats->copied_in += e.copied;
    PyObject *reply, *held = NULL, *result = NULL;
    int outcome = CALL_SENT,
        pushed = queue_push_record(m, out_q, PyBytes_AS_STRING(e.frame), PyBytes_GET_SIZE(e.frame),
                                   -1.0, self->spin_s, in_q);
    if (pushed != 1) {
        outcome = CALL_NOT_SENT;
        reply = pushed < 0 ? take_exception() : Py_NewRef(Py_None);
    } else {
        reply = queue_pop_record(m, in_q, self->spin_s, &self->spin_s);
        if (!reply) reply = take_exception();
        else if (reply != Py_None && is_result_of(reply, call_id)) {
            int checked;
            unsigned long long copied_out;
            PyObject *outputs = decode_result(reply, self->decoding, out_rows, bindings, &copied_out,
                                              &checked);
            if (outputs) {
                outcome = out_rows == Py_None || checked ? CALL_ANSWERED : CALL_UNCHECKED;
                if (stats) stats->copied_out += copied_out;
                Py_SETREF(reply, outputs);
            } else if (PyErr_Occurred()) {
                Py_SETREF(reply, take_exception()); /* an interrupt: the reply is lost with it */
            }
        }
    }
    if (outcome == CALL_SENT) { /* the call still holds its inputs: Python's lists of them */
        held = tuple_stealing(2, copies_list(&e), Py_NewRef(e.sealed));
        if (held) encoded_clear(&e);
        else encoded_release_raising(&e);
    } else if (!encoded_release(&e)) {
        held = Py_NewRef(Py_None);
    }
    if (held)
        result = tuple_stealing(4, PyLong_FromLong(outcome), Py_NewRef(reply), Py_NewRef(held),
                                Py_NewRef(bindings));
    if (!result && held && held != Py_None)
        release_raising(PyTuple_GET_ITEM(held, 0), PyTuple_GET_ITEM(held, 1));
    Py_XDECREF(held);
    Py_DECREF(reply);
    Py_DECREF(bindings);
    return result;
}

/* ---- the host's session with one worker incarnation ----------------------------------------- */

/* Session(mapping, out_q, in_q, encoding, decoding, checks, stats): what every call of one worker
 * incarnation needs, gathered once when the worker starts (the channel's queues and its spin,
 * the arena's frame codec arguments, the spec's rows, the model's CallStats or None), so a call
 * passes only what is its own. Its lone calls, and the general path's sends and receives, share
 * the one spin policy. */
static int session_init(SessionObject *self, PyObject *args, PyObject *kw) {
    PyObject *mapping, *encoding, *decoding, *checks, *stats;
    long long out_q, in_q;
    if (!PyArg_ParseTuple(args, "O!LLO!O!O!O", &MappingType, &mapping, &out_q, &in_q, &PyTuple_Type,
                          &encoding, &PyTuple_Type, &decoding, &PyTuple_Type, &checks, &stats))
        return -1;
    if (PyTuple_GET_SIZE(encoding) != 4 || PyTuple_GET_SIZE(decoding) != 5 ||
        PyTuple_GET_SIZE(checks) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(checks, 0)) ||
        !PyTuple_Check(PyTuple_GET_ITEM(checks, 1)) ||
        (stats != Py_None && !PyObject_TypeCheck(stats, &CallStatsType))) {
        PyErr_SetString(PyExc_TypeError, "Session(mapping, out_q, in_q, (4 encoding args), "
                                         "(5 decoding args), (input rows, output rows), "
                                         "CallStats or None)");
        return -1;
    }
    Py_XSETREF(self->mapping, (MappingObject *)Py_NewRef(mapping));
    Py_XSETREF(self->encoding, Py_NewRef(encoding));
    Py_XSETREF(self->decoding, Py_NewRef(decoding));
    Py_XSETREF(self->checks, Py_NewRef(checks));
    Py_XSETREF(self->stats, stats == Py_None ? NULL : (CallStatsObject *)Py_NewRef(stats));
    self->out_q = out_q;
    self->in_q = in_q;
    self->spin_s = SPIN_S;
    return 0;
}

static void session_dealloc(SessionObject *self) {
    Py_XDECREF(self->mapping);
    Py_XDECREF(self->encoding);
    Py_XDECREF(self->decoding);
    Py_XDECREF(self->checks);
    Py_XDECREF(self->stats);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int session_ready(SessionObject *self) {
    if (self->mapping) return 1;
    PyErr_SetString(PyExc_RuntimeError, "Session not initialised");
    return 0;
}

/* session.call(call_id, tensors, check): see lone_call(). */
static PyObject *session_call(SessionObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "Session.call(call_id, tensors, check)");
        return NULL;
    }
    if (!session_ready(self)) return NULL;
    unsigned long long call_id = PyLong_AsUnsignedLongLong(args[0]);
    int check = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred() || check < 0) return NULL;
    return lone_call(self, call_id, args[1], check ? self->checks : Py_None);
}

/* session.send(data, timeout_s) -> queued: push a message (see queue_push_record()). */
static PyObject *session_send(SessionObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer msg;
    if (nargs != 2 || !session_ready(self)) {
        if (nargs != 2) PyErr_SetString(PyExc_TypeError, "Session.send(data, timeout_s)");
        return NULL;
    }
    double timeout_s = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred() || PyObject_GetBuffer(args[0], &msg, PyBUF_SIMPLE) < 0) return NULL;
    int status = queue_push_record(self->mapping, self->out_q, msg.buf, msg.len, timeout_s,
                                   self->spin_s, self->in_q);
    PyBuffer_Release(&msg);
    return status < 0 ? NULL : PyBool_FromLong(status);
}

/* session.receive(timeout_s) -> bytes or None: the next message (see queue_pop_record()). */
static PyObject *session_receive(SessionObject *self, PyObject *arg) {
    double timeout_s = PyFloat_AsDouble(arg);
    if ((timeout_s == -1.0 && PyErr_Occurred()) || !session_ready(self)) return NULL;
    return queue_pop_record(self->mapping, self->in_q, timeout_s, &self->spin_s);
}

static PyMethodDef session_methods[] = {
    {"call", (PyCFunction)(void (*)(void))session_call, METH_FASTCALL,
     "call(call_id, tensors, check) -> (outcome, reply, held, bindings): a lone call."},
    {"send", (PyCFunction)(void (*)(void))session_send, METH_FASTCALL,
     "send(data, timeout_s) -> queued (False: closed, or full past the timeout)."},
    {"receive", (PyCFunction)session_receive, METH_O,
     "receive(timeout_s) -> the next message's bytes, or None (timeout, or closed and empty)."},
    {NULL}};

static PyMemberDef session_members[] = {
    {"spin_s", T_DOUBLE, offsetof(SessionObject, spin_s), 0, "the spin of the next wait"},
    {NULL}};

PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ope_native.Session",
    .tp_basicsize = sizeof(SessionObject),
    .tp_dealloc = (destructor)session_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Session(mapping, out_q, in_q, encoding, decoding, checks, stats): the host's "
              "calls to one worker incarnation.",
    .tp_methods = session_methods,
    .tp_members = session_members,
    .tp_init = (initproc)session_init,
    .tp_new = PyType_GenericNew,
};

