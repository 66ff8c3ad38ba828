/* platform.c: futex waits and the worker's watchdog, the parts of ope_native that talk to the
 * kernel rather than to Python or to shared memory.
 *
 * A wait spins first and sleeps only when the answer is slow, because a wake-up costs more
 * than a quick answer; the watchdog is a plain thread, so nothing the model does in Python
 * can delay it.
 */
#include "platform.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Shared (not PRIVATE) futex ops: the word lives in memory mapped by several processes. */
int futex_wait(uint32_t *word, uint32_t expected, double timeout_s) {
    struct timespec ts, *tsp = NULL;
    if (timeout_s >= 0) {
        ts.tv_sec = (time_t)timeout_s;
        ts.tv_nsec = (long)((timeout_s - (double)ts.tv_sec) * 1e9);
        tsp = &ts;
    }
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
}

void futex_wake(uint32_t *word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

int wait_for_change(uint64_t *watch, uint64_t expected, uint32_t *closed, uint32_t *bell,
                    uint32_t *sleeping, const uint32_t *peer_cpu, double spin_s, double timeout_s) {
    double start = monotonic_now();
    double deadline = timeout_s < 0 ? -1.0 : start + timeout_s;
    double spin_until = start + spin_s;
    unsigned n = 0;
    for (;;) {
        /* SYNC POINT with the producer's release store of head/tail (queue) or state. */
        if (__atomic_load_n(watch, __ATOMIC_ACQUIRE) != expected) return WAIT_CHANGED;
        if (__atomic_load_n(closed, __ATOMIC_ACQUIRE)) return WAIT_CLOSED;
        CPU_RELAX();
        if ((++n & 7) == 0) {
            /* Relaxed: a hint about placement, not data. */
            if ((uint32_t)sched_getcpu() == __atomic_load_n(peer_cpu, __ATOMIC_RELAXED))
                sched_yield();
            else if ((n & 511) == 0)
                sched_yield(); /* a third process may be waiting for this CPU */
            if ((n & 63) == 0) {
                double now = monotonic_now();
                if (deadline >= 0 && now >= deadline) return WAIT_TIMEOUT;
                if (now >= spin_until) break;
            }
        }
    }
    for (;;) {
        /* SYNC POINT with ring_bell(): seq_cst store of sleeping, then re-check. */
        __atomic_store_n(sleeping, 1, __ATOMIC_SEQ_CST);
        uint32_t seen = __atomic_load_n(bell, __ATOMIC_SEQ_CST);
        int result = 2;
        if (__atomic_load_n(watch, __ATOMIC_SEQ_CST) != expected) result = WAIT_CHANGED;
        else if (__atomic_load_n(closed, __ATOMIC_SEQ_CST)) result = WAIT_CLOSED;
        double remaining = -1.0;
        if (result == 2 && deadline >= 0) {
            remaining = deadline - monotonic_now();
            if (remaining <= 0) result = WAIT_TIMEOUT;
        }
        if (result == 2 && futex_wait(bell, seen, remaining) != 0 && errno == EINTR) {
            __atomic_store_n(sleeping, 0, __ATOMIC_SEQ_CST);
            PyGILState_STATE g = PyGILState_Ensure();
            int failed = PyErr_CheckSignals();
            PyGILState_Release(g);
            if (failed) return WAIT_ERROR;
            continue;
        }
        __atomic_store_n(sleeping, 0, __ATOMIC_SEQ_CST);
        if (result != 2) return result;
    }
}

/* The worker's guarantee that it never outlives its host, whatever its model is doing: a
 * plain pthread (no GIL, so a model stuck in C code holding the GIL cannot delay it) sleeps in
 * poll() on a pidfd of the parent and on the read end of the host's pipe, whose write end only
 * the host holds, close-on-exec: end of file on it means the host died or exec'd another
 * program (which keeps the pid, so the pidfd alone misses it). The pidfd still catches a host
 * that died while a child forked behind Python's back holds the write end; the pipe alone
 * still works across pid namespaces. When the host is gone the watchdog SIGKILLs its own
 * process; the arena needs no clean-up, its segments are memfds, gone with their last holder.
 * getppid() is checked as well, for kernels without pidfd. PR_SET_PDEATHSIG is not used: it
 * fires when the parent *thread* exits, and hosts start workers from whichever thread makes
 * the call. */
typedef struct {
    pid_t parent;
    int pipe_fd;
} ParentWatch;

static void *parent_watch(void *arg) {
    ParentWatch *w = arg;
    struct pollfd p[2];
    nfds_t n = 0;
    int pidfd = (int)syscall(SYS_pidfd_open, w->parent, 0);
    if (pidfd >= 0) p[n++] = (struct pollfd){pidfd, POLLIN, 0};
    if (w->pipe_fd >= 0) p[n++] = (struct pollfd){w->pipe_fd, POLLIN, 0};
    for (;;) {
        if (getppid() != w->parent) break;
        /* With nothing to watch, poll() sleeps out its timeout and getppid() decides. */
        if (poll(p, n, 100) <= 0) continue;
        int gone = 0;
        for (nfds_t i = 0; i < n; i++) {
            /* The host never writes to the pipe: any readiness is end of file. */
            if (p[i].revents & ~POLLNVAL) gone = 1;
        }
        if (gone) break;
        /* A descriptor the model closed under the watchdog: watch what is left. */
        nfds_t kept = 0;
        for (nfds_t i = 0; i < n; i++) {
            if (!(p[i].revents & POLLNVAL)) p[kept++] = p[i];
        }
        n = kept;
    }
    kill(getpid(), SIGKILL);
    return NULL;
}

/* exit_with_parent(pid, pipe_fd=-1): see parent_watch(). */
PyObject *exit_with_parent(PyObject *m, PyObject *args) {
    long parent;
    int pipe_fd = -1;
    if (!PyArg_ParseTuple(args, "l|i", &parent, &pipe_fd)) return NULL;
    if (pipe_fd >= 0) {
        struct stat st;
        if (fstat(pipe_fd, &st) != 0 || !S_ISFIFO(st.st_mode)) {
            PyErr_Format(PyExc_ValueError, "descriptor %d is not the read end of a pipe", pipe_fd);
            return NULL;
        }
    }
    if (getppid() != (pid_t)parent) {
        PyErr_Format(PyExc_RuntimeError, "parent %ld is already gone", parent);
        return NULL;
    }
    ParentWatch *w = PyMem_RawMalloc(sizeof *w); /* lives as long as the process */
    if (!w) return PyErr_NoMemory();
    w->parent = (pid_t)parent;
    w->pipe_fd = pipe_fd;
    pthread_t t;
    int err = pthread_create(&t, NULL, parent_watch, w);
    if (err) {
        PyMem_RawFree(w);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pthread_detach(t);
    Py_RETURN_NONE;
}
