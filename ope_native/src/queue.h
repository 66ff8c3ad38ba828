/* queue.h: the message queue (layout: layout.h; described in ope/bridge/channel.py).
 *
 * One producer and one consumer per queue, in different processes; a channel is two queues,
 * one per direction.
 */
#ifndef OPE_QUEUE_H
#define OPE_QUEUE_H

#include "mapping.h"

/* How long a waiter spins before it sleeps: why this long, see queue_pop_record(). */
#define SPIN_S 200e-6

int queue_push_record(MappingObject *m, long long q, const char *buf, Py_ssize_t len,
                      double timeout_s, double spin_s, long long peer_q);
PyObject *queue_pop_record(MappingObject *m, long long q, double timeout_s, double *spin_s);

/* Mapping methods */
PyObject *mapping_queue_init(MappingObject *self, PyObject *args);
PyObject *mapping_queue_push(MappingObject *self, PyObject *args);
PyObject *mapping_queue_pop(MappingObject *self, PyObject *args);
PyObject *mapping_queue_close(MappingObject *self, PyObject *arg);

#endif
