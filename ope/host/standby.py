"""Standby workers: loaded workers kept idle beside the serving one, so that a fault costs the
next call no start.

A worker that is started but not serving is an :class:`Incarnation`: its process, its own
connection to the model's arena (an ope.bridge.arena.Link: control segment and socket), the
ope_native.Session and protocol conversation over it, and what it reported when it loaded.
The serving worker's start makes one and installs it at once; a :class:`StandbyPool` makes
``count`` more and keeps them ready. A ready standby has said HELLO, loaded the package
(manifest digest, requirements, runner) exactly as the serving worker did, and waits for its
first call on its own queue, asleep on a futex: it costs no CPU. Installing one
(WorkerLifecycle._install) is a pointer swap: the arena adopts its link (handing it any data
segment of the host's made since it started, arrays from ``model.empty`` among them), and
the model's worker, session and conversation become its.

The pool refills in a thread of its own, which runs only while the pool is short and ends
when it is full again, closed, or its restart policy is broken: standbys that fail to start
or die while idle count against that policy (backoff, ``max_restarts`` per window), apart
from the serving worker's, so a standby that cannot be kept never breaks a model that
serves. Each refill also waits out the serving worker's backoff: a crash loop slows down.
The supervisor's round (:meth:`StandbyPool.supervise`) holds standbys to the model's memory
limit; a standby's death is told at once by the output thread's watch of its exit (or seen
by that round where pidfds are missing). The pool's lock guards its lists alone and is taken
last, for a few steps, under any of the model's locks.
"""

import logging
import threading

from ope.errors import OpeError
from ope.host.supervisor import RestartPolicy
from ope.host.worker_process import describe_exit

__all__ = ["Incarnation", "StandbyPool"]

_log = logging.getLogger("ope")


class Incarnation:
    """One started worker with its own link to the arena, not (or not yet) serving."""

    __slots__ = ("worker", "link", "session", "conversation", "info")

    def __init__(self, worker, link, session, conversation):
        self.worker, self.link = worker, link
        self.session, self.conversation = session, conversation
        self.info = {}

    def discard(self, grace_s):
        """Stop the worker (its whole group) and drop its link."""
        self.link.close()
        self.worker.stop(grace_s)


class StandbyPool:
    """Keeps ``count`` loaded standbys of one model ready (the module docstring).

    ``launch(stopping)`` starts and loads an Incarnation (WorkerLifecycle._launch), raising
    if it fails, ModelClosed once ``stopping()``; ``serving`` is the model's RestartPolicy,
    whose backoff each refill waits out too; ``closing`` the model's event that ends waits."""

    def __init__(self, count, launch, serving, closing, max_restarts, window_s, grace_s):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"standby must be a non-negative int, got {count!r}")
        self.count = count
        self.policy = RestartPolicy(max_restarts, window_s)
        self._launch, self._serving, self._closing = launch, serving, closing
        self._grace_s = grace_s
        self._lock = threading.Lock()
        self._ready = []  # Incarnations, oldest first
        self._starting = {}  # WorkerProcess loading -> whether it is a standby's
        self._dead = []  # ready standbys seen dead, for the refill thread to bury
        self._thread = None
        self._filling = False
        self._started = False  # until the model has its first worker: no refill
        self._closed = False

    # -- the model's side ---------------------------------------------------------------

    def take(self):
        """A ready standby to install, or None; the pool refills behind it."""
        with self._lock:
            while self._ready:
                incarnation = self._ready.pop(0)
                if incarnation.worker.alive():
                    break
                self._dead.append(incarnation)
            else:
                incarnation = None
        self.fill()
        return incarnation

    @property
    def ready(self):
        return len(self._ready)

    def starting(self, worker, loading, standby):
        """Note ``worker`` (a ``standby``'s, or the serving worker's start) as loading
        (``loading`` True) or done: the supervisor holds it to the memory limit meanwhile."""
        with self._lock:
            if loading:
                self._starting[worker] = standby
            else:
                self._starting.pop(worker, None)

    def supervise(self, check_memory):
        """The supervisor's round over the standbys: ``check_memory(worker)`` kills one past
        the memory limit (and returns why, or None); a ready standby found dead leaves the
        pool, counts as a failure and is replaced. Never waits."""
        with self._lock:
            ready = list(self._ready)
            starting = list(self._starting)
        for worker in starting:
            check_memory(worker)
        dead = []
        for incarnation in ready:
            reason = check_memory(incarnation.worker)
            if not incarnation.worker.alive():
                dead.append((incarnation.worker, reason))
        for worker, reason in dead:
            self.exited(worker, reason)

    def exited(self, worker, reason=None):
        """``worker`` was seen dead (``reason``: why the supervisor killed it, if it did): if
        it is a ready standby, it leaves the pool, counts as a failure and is replaced."""
        with self._lock:
            lost = [i for i in self._ready if i.worker is worker]
            if not lost:
                return  # not a ready standby, or seen dead already
            self._ready.remove(lost[0])
            self._dead.append(lost[0])
            self.policy.record(f"standby pid {worker.pid} "
                               f"{reason or describe_exit(worker.returncode)} while idle")
        worker.logger.warning("standby worker pid %d died while idle", worker.pid)
        self.fill()

    def describe(self):
        """What health() and stats() show of the standbys."""
        with self._lock:
            workers = [{"pid": i.worker.pid, "state": "ready"} for i in self._ready]
            workers += [{"pid": w.pid, "state": "starting"}
                        for w, standby in self._starting.items() if standby]
        ready = sum(1 for w in workers if w["state"] == "ready")
        state = ("closed" if self._closed else "off" if not self.count
                 else "broken" if self.policy.broken
                 else "ready" if ready >= self.count else "filling")
        return {"wanted": self.count, "ready": ready, "state": state, "workers": workers,
                "pids": [w["pid"] for w in workers if w["state"] == "ready"],
                "failures": [{"time": t, "reason": r} for t, _, r in self.policy.history]}

    def close(self):
        """Stop the refill thread and every standby. The caller holds none of the model's
        locks (a refill may be waiting for one)."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            gone, self._ready, self._dead = self._ready + self._dead, [], []
        for incarnation in gone:
            incarnation.discard(self._grace_s)

    # -- refilling ----------------------------------------------------------------------

    def start(self):
        """Begin keeping the pool full: the model has its first worker."""
        with self._lock:
            self._started = True
        self.fill()

    def fill(self):
        """Start the refill thread if the pool is short and none runs."""
        with self._lock:
            if (self._filling or self._closed or not self._started
                    or not (self._dead or self._short())):
                return
            self._filling = True
            self._thread = threading.Thread(target=self._refill, daemon=True,
                                            name="ope-standby")
            self._thread.start()

    def _short(self):  # the caller holds _lock
        return (len(self._ready) < self.count and not self.policy.broken
                and not self._serving.broken)

    def _refill(self):
        """The refill thread: buries dead standbys and starts new ones until the pool is full."""
        while True:
            with self._lock:
                dead, self._dead = self._dead, []
                done = self._closed or not self._short()
                if done and not dead:
                    self._filling = False
                    return
            for incarnation in dead:
                incarnation.discard(self._grace_s)
            if done:
                continue
            wait = max(self.policy.delay_s(), self._serving.delay_s())
            if wait > 0:
                self._closing.wait(wait)
                continue
            self._start_one()

    def _start_one(self):
        try:
            incarnation = self._launch(lambda: self._closed)
        except OpeError as exc:
            if not self._closed:
                self.policy.record(f"standby start failed: {type(exc).__name__}: {str(exc)[:200]}")
                _log.warning("starting a standby worker failed: %s", exc)
            return
        except Exception as exc:  # this thread must go on, or the pool would stay short
            _log.exception("starting a standby worker failed")
            self.policy.record(f"standby start failed: {type(exc).__name__}: {str(exc)[:200]}")
            return
        with self._lock:
            keep = not self._closed
            if keep:
                self._ready.append(incarnation)
                self.policy.in_a_row = 0
        if not keep:
            incarnation.discard(self._grace_s)
