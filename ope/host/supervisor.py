"""Supervision of a host's models: one thread watches every worker, and a policy bounds how
often a model's worker is replaced.

One :class:`Supervisor` thread per host enforces memory limits (worker_process.private_rss),
notes the worker's descendants, and sees workers that die while no call waits on them. It
only looks: it never waits on a model, and whatever takes time (discarding a worker, backoff,
starting one) runs in that model's own restart thread, so no model's trouble delays the
supervision of another. Failed workers are replaced under a :class:`RestartPolicy`: at most
``max_restarts`` failures within ``window_s``, each restart delayed by an exponential
backoff; past that the model is broken and refuses calls with its failure history.
"""

import logging
import threading
import time
import weakref

from ope.host.per_process import PerProcess

__all__ = ["RestartPolicy", "Supervisor"]

_log = logging.getLogger("ope.supervisor")


class RestartPolicy:
    """Bounded restarts with exponential backoff, and the failure history for error messages.

    The model is broken after more than ``max_restarts`` failures within ``window_s``. Each
    start waits ``backoff_s * 2**(k-1)`` (at most ``max_backoff_s``) after the k-th failure in
    a row; a call that succeeds ends the row, so a crash loop slows down while an occasional
    fault in a busy model costs no delay."""

    def __init__(self, max_restarts=5, window_s=60.0, backoff_s=0.05, max_backoff_s=5.0):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.history = []  # (wall-clock time, monotonic time, reason)
        self.in_a_row = 0

    def record(self, reason):
        self.history.append((time.time(), time.monotonic(), reason))
        del self.history[:-100]
        self.in_a_row += 1

    @property
    def broken(self):
        since = time.monotonic() - self.window_s
        return sum(1 for h in self.history if h[1] >= since) > self.max_restarts

    def delay_s(self):
        """How long to wait before the next start."""
        if not self.in_a_row:
            return 0.0
        wait = min(self.backoff_s * 2 ** (self.in_a_row - 1), self.max_backoff_s)
        return max(0.0, self.history[-1][1] + wait - time.monotonic())

    def describe(self):
        return "; ".join(f"{time.strftime('%H:%M:%S', time.localtime(t))} {reason}"
                         for t, _, reason in self.history[-10:])


class Supervisor(PerProcess):
    """The host's one watcher thread: memory limits and the liveness of idle workers of all
    models.

    Models register with :meth:`watch`; the thread holds them weakly and calls
    ``model._supervise()`` every :attr:`interval_s`, which must not wait on the model (a lock
    only tried, no start or stop): one model's round is short, whatever the others do."""

    interval_s = 0.1

    def __init__(self):
        self._models = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ope-supervisor", daemon=True)
        self._thread.start()

    def watch(self, model):
        with self._lock:
            self._models.add(model)

    def unwatch(self, model):
        with self._lock:
            self._models.discard(model)

    def _run(self):
        due = time.monotonic()
        while True:
            # Rounds keep their cadence: the time a round took comes off the next wait.
            due = max(due + self.interval_s, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))
            with self._lock:
                models = list(self._models)
            for model in models:
                try:
                    model._supervise()
                except Exception:  # one model's trouble must not stop supervision of the rest
                    _log.exception("supervising model %r failed", getattr(model, "name", model))

