"""Supervision of worker processes: start, watch, restart, and stop them for sure.

The host never relies on a worker's help to learn of its death: waits on the channel are cut
into slices of :data:`LIVENESS_SLICE_S` and each slice checks the process (``waitpid``), so a
crash (signal, ``os._exit``, OOM kill) is seen within one slice even while a call is blocked;
liveness does not rest on a thread inside the worker, so a model stuck in a Python loop or in
C code is caught by its deadline all the same. One :class:`Supervisor` thread per host
enforces memory limits (private RSS of the worker and its children, by psutil) and sees
workers that die while no call waits on them. It only looks: it never waits on a model, and
whatever takes time (discarding a worker, backoff, starting one) runs in that model's own
restart thread, so no model's trouble delays the supervision of another. A worker's output
(stdout and stderr, merged) goes line by line to the logger ``ope.worker.<model name>``; the
last lines are kept for error messages.

Stopping is a ladder that is always climbed to the end: ask (SHUTDOWN), wait; SIGTERM, wait;
SIGKILL, wait. Failed workers are replaced under a :class:`RestartPolicy`: at most
``max_restarts`` failures within ``window_s``, each restart delayed by an exponential backoff;
past that the model is broken and refuses calls with its failure history. A worker never
outlives its host: it runs a native watchdog on the host's pid (ope_native.exit_with_parent)
that also removes the host's segments.
"""

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import psutil

__all__ = ["WorkerProcess", "RestartPolicy", "Supervisor", "LIVENESS_SLICE_S", "describe_exit",
           "child_environment", "private_rss"]

_log = logging.getLogger("ope.supervisor")

LIVENESS_SLICE_S = 0.05
_TAIL_LINES = 40


def _worker_command(python):
    """The command that starts a worker. Another interpreter than ours runs isolated (-I): the
    host's current folder, PYTHONPATH and user site must not leak in, or it would import the
    host's ope, and an ope_native built for another Python, instead of its own; -u because -I
    also drops PYTHONUNBUFFERED. Our own interpreter must import the host's very ope, so the
    folder that holds it goes first on sys.path, before the current folder (``-m`` would put
    the current folder first, and an old checkout in it would be imported instead)."""
    # Not realpath: a venv's python is a symlink to its base interpreter, yet another
    # environment (its pyvenv.cfg, beside the link, decides sys.prefix).
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        return [sys.executable, "-c", _BOOTSTRAP.format(root=_HOST_ROOT)]
    return [python, "-I", "-u", "-m", "workers.worker"]


_HOST_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BOOTSTRAP = ("import runpy, sys; sys.path.insert(0, {root!r}); "
              "runpy.run_module('workers.worker', run_name='__main__', alter_sys=True)")


def describe_exit(returncode):
    """'killed by SIGSEGV' / 'exited with code 3' for a Popen returncode."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class WorkerProcess:
    """One started worker process and the thread that reads its output."""

    def __init__(self, name, args, *, python=None, env=None):
        self.name = name
        self.logger = logging.getLogger(f"ope.worker.{name}")
        self._tail = collections.deque(maxlen=_TAIL_LINES)
        self.proc = subprocess.Popen(
            [*_worker_command(python), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, close_fds=True,
            # Terminal signals (Ctrl-C) go to the host, which then stops its workers in order.
            start_new_session=True)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read_output, name=f"ope-output-{name}",
                                        daemon=True)
        self._reader.start()

    def _read_output(self):
        with self.proc.stdout as stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._tail.append(line)
                self.logger.info("%s", line)

    def alive(self):
        return self.proc.poll() is None

    @property
    def returncode(self):
        return self.proc.poll()

    def output_tail(self, wait_s=0.5):
        """The last lines the worker wrote; once it is dead, waits for its output to drain."""
        if not self.alive():
            self._reader.join(wait_s)
        return "\n".join(self._tail)

    def stop(self, grace_s, asked=False):
        """Climb the ladder: (if ``asked`` to shut down: wait), SIGTERM, wait, SIGKILL, wait.
        Returns the step that ended it: 'exited', 'terminated' or 'killed'."""
        if self.proc.poll() is not None or (asked and self._wait(grace_s)):
            return "exited"
        self.proc.terminate()
        if self._wait(grace_s):
            return "terminated"
        self.proc.kill()
        self.proc.wait()
        return "killed"

    def kill(self):
        """SIGKILL at once (for a worker past its deadline or its memory limit) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def _wait(self, timeout_s):
        try:
            self.proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def reap(self):
        """Release the process's resources once it is dead (reader thread, pipe)."""
        self.proc.wait()
        self._reader.join(1.0)

    def __repr__(self):
        return f"<WorkerProcess {self.name} pid={self.pid} {describe_exit(self.proc.poll())}>"


def child_environment(extra=None):
    """The environment a worker starts with: ours, unbuffered, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def private_rss(pid):
    """Bytes of private resident memory of ``pid`` and its descendants (RSS less shared pages:
    the arena and shared libraries are not the worker's own growth). None once it is gone."""
    try:
        root = psutil.Process(pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                info = proc.memory_info()
            except psutil.NoSuchProcess:
                continue
            total += info.rss - info.shared
        return total
    except psutil.NoSuchProcess:
        return None


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


class Supervisor:
    """The host's one watcher thread: memory limits and the liveness of idle workers of all
    models.

    Models register with :meth:`watch`; the thread holds them weakly and calls
    ``model._supervise()`` every :attr:`interval_s`, which must not wait on the model (a lock
    only tried, no start or stop): one model's round is short, whatever the others do."""

    interval_s = 0.1
    _instance = None
    _instance_lock = threading.Lock()

    def __init__(self):
        self._models = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ope-supervisor", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls):
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

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
