/* platform.h: the operating system under the shared-memory structures.
 *
 * Futex wait/wake on words shared between processes, the monotonic clock, waits that spin
 * briefly and then sleep (the GIL released), and the worker's watchdog on its host. The clock
 * and the bell are inline: they run on every message.
 */
#ifndef OPE_PLATFORM_H
#define OPE_PLATFORM_H

#include "native.h"

#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static inline uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int futex_wait(uint32_t *word, uint32_t expected, double timeout_s);
void futex_wake(uint32_t *word);

/* Rings `bell` after the caller published a change. Pairs with wait_for_change(): the
 * seq_cst increment and the load of `sleeping` form a Dekker pair with the waiter's seq_cst
 * store of `sleeping` and its re-check of the watched word, so a waiter either sees the change
 * or is woken. */
static inline void ring_bell(uint32_t *bell, uint32_t *sleeping) {
    __atomic_add_fetch(bell, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(sleeping, __ATOMIC_SEQ_CST)) futex_wake(bell);
}

enum wait_result { WAIT_CHANGED = 1, WAIT_TIMEOUT = 0, WAIT_CLOSED = -1, WAIT_ERROR = -2 };

/* Waits until the u64 at `watch` differs from `expected`, `closed` becomes non-zero, or the
 * deadline passes. Spins for `spin_s` first (a futex round trip costs tens of microseconds on
 * a VM; spinning catches a quick answer), then sleeps on `bell`. While spinning, if the peer
 * last ran on this very CPU (`peer_cpu`), it cannot answer while the waiter holds the CPU: yield it.
 * (Wake-ups place a woken process on the waker's CPU, and two processes that then never
 * sleep look cache-hot to the scheduler and stay together.) Called with the GIL released;
 * re-takes it only to deliver signals. Returns an enum wait_result. */
int wait_for_change(uint64_t *watch, uint64_t expected, uint32_t *closed, uint32_t *bell,
                    uint32_t *sleeping, const uint32_t *peer_cpu, double spin_s, double timeout_s);

/* exit_with_parent(pid, pipe_fd=-1): see platform.c, parent_watch(). */
PyObject *exit_with_parent(PyObject *m, PyObject *args);

#endif
