/* memhook.h: numpy arrays born in the worker's data ring while its model runs (memhook.c). */
#ifndef OPE_MEMHOOK_H
#define OPE_MEMHOOK_H

#include "mapping.h"

#ifndef OPE_HOOK_TYPE
#define OPE_HOOK_TYPE
typedef struct Hook Hook;
#endif

/* The Hook a capsule from memhook_new() holds, or NULL (None: numpy has no handler API). */
Hook *hook_of(PyObject *capsule);
/* Installs the hook's numpy handler for this thread's context; returns the previous handler
 * (a new reference) to give to hook_uninstall(), or NULL with an error set. Installed, it
 * cuts from the rings only while activated (the model's call), else it is malloc. */
PyObject *hook_install(Hook *h, PyObject *capsule);
void hook_activate(Hook *h, int active);
int hook_uninstall(Hook *h, PyObject *previous);
/* Whether `array` owns a block the hook cut from an own ring and holds no references but
 * the `refs` its encoder knows of (the outputs dict's, its own): then 1 and the segment id
 * and payload offset it lies at. */
int hook_adoptable(Hook *h, PyArrayObject *array, Py_ssize_t refs, PyObject *own,
                   unsigned long long *seg, unsigned long long *offset);
/* The block under `data` (from hook_adoptable()) now belongs to the peer, which gives it back:
 * freeing the array no longer releases it. */
void hook_hand_over(Hook *h, void *data);

PyObject *memhook_new(PyObject *mod, PyObject *const *args, Py_ssize_t nargs);
PyObject *memhook_counts(PyObject *mod, PyObject *capsule);

#endif
