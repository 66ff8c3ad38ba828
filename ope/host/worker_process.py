"""Worker processes: start them, see them die, and stop them for sure.

The host never relies on a worker's help to learn of its death: waits on the channel are cut
into slices of :data:`LIVENESS_SLICE_S` and each slice checks the process (``waitpid``), so a
crash (signal, ``os._exit``, OOM kill) is seen within one slice even while a call is blocked;
liveness does not rest on a thread inside the worker, so a model stuck in a Python loop or in
C code is caught by its deadline all the same. A worker's output (stdout and stderr, merged)
goes line by line to the logger ``ope.worker.<model name>``, read for all workers by one
thread; the last lines are kept for error messages. :func:`private_rss` measures what the
supervisor (supervisor.py) holds against a memory limit: the resident memory of the worker
and its descendants, anonymous and shared, less the arena.

Stopping is a ladder that is always climbed to the end: ask (SHUTDOWN), wait; SIGTERM to the
worker's process group, wait; SIGKILL to the group and to every descendant noted, reap. What a
model started dies with its worker, however the worker ends. A worker never outlives its host:
it runs a native watchdog (ope_native.exit_with_parent) on the host's pid and on the read end
of a pipe whose write end only the host holds, close-on-exec, so that the host's death and its
exec of another program both end the worker.
"""
import collections
import logging
import os
import re
import select
import selectors
import signal
import subprocess
import sys
import threading
import time

import psutil

from ope.bridge.arena import SEGMENT_NAME
from ope.host.per_process import PerProcess

__all__ = ["WorkerProcess", "LIVENESS_SLICE_S", "describe_exit",
           "child_environment", "private_rss", "is_arena_mapping"]

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


# The folder that holds the ope package (and workers/) this host runs.
_HOST_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


_host_pipe = None  # (read end, write end) of this process's pipe to its workers' watchdogs
_host_pipe_lock = threading.Lock()


def _host_pipe_read_end():
    """The read end to hand a worker's watchdog. The pipe is made once per host process and
    its write end stays open, unused, for the host's whole life; both ends are close-on-exec
    (PEP 446) and workers get only the read end (pass_fds), so the write end closes exactly
    when the host dies or execs, and every worker's watchdog sees end of file."""
    global _host_pipe
    with _host_pipe_lock:
        if _host_pipe is None:
            _host_pipe = os.pipe()
        return _host_pipe[0]


def _after_fork_in_child():
    """A forked child must not hold its parent's write end: it would keep the parent's
    workers alive after the parent execs. A child that loads models makes its own pipe.
    Locks another thread may have held at the fork are made anew."""
    global _host_pipe, _host_pipe_lock, _scan_lock
    _host_pipe_lock, _scan_lock = threading.Lock(), threading.Lock()
    if _host_pipe is not None:
        for fd in _host_pipe:
            os.close(fd)
        _host_pipe = None


class WorkerProcess:
    """One started worker process, in a session (so a process group) of its own, with what it
    started. Stopping the worker, or finding it dead, kills its whole group and every
    descendant that :meth:`sample` has seen (those that left the group too): nothing a model
    starts outlives its worker, and nothing it left holding the output pipe delays an error.

    The worker is reaped only by :meth:`kill`, after the signals to its group: until then the
    zombie keeps its pid, which is the group's id, from being reused."""

    def __init__(self, name, args, *, python=None, env=None, pass_fds=(), on_exit=None):
        self.name = name
        self.logger = logging.getLogger(f"ope.worker.{name}")
        host_pipe = _host_pipe_read_end()
        self.proc = subprocess.Popen(
            [*_worker_command(python), *args, "--host-pipe", str(host_pipe)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=env, close_fds=True, pass_fds=(host_pipe, *pass_fds),
            # Terminal signals (Ctrl-C) go to the host, which then stops its workers in order.
            start_new_session=True)
        self.pid = self.proc.pid
        self._lock = threading.Lock()  # orders signals to the group, sampling, and the reap
        self._reaped = False
        self._descendants = {}  # pid -> psutil.Process (which checks its pid is not reused)
        try:
            self._output = _WorkerOutput(self.proc.stdout, self.logger)
            self._reader = _OutputReader.get()
            self._reader.add(self._output)
            self._exit_watch = None if on_exit is None else self._reader.watch_exit(self, on_exit)
        except BaseException:
            _signal_group(self.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc.stdout.close()
            raise

    def alive(self):
        return self.returncode is None

    @property
    def returncode(self):
        """The Popen-style return code once the worker has exited, else None; does not reap."""
        if self._reaped:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped behind our back
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def output_tail(self):
        """The last lines the worker wrote; after :meth:`kill`, all it wrote is in."""
        return self._output.tail()

    def usage(self):
        """RSS, private RSS (the worker and its descendants) and CPU times, as far as the
        process can still be read ({} once it is gone)."""
        try:
            proc = psutil.Process(self.pid)
            with proc.oneshot():
                memory = proc.memory_info()
                cpu = proc.cpu_times()
            return {"rss_bytes": memory.rss, "private_rss_bytes": private_rss(self.sample()),
                    "cpu_user_s": cpu.user, "cpu_system_s": cpu.system}
        except psutil.Error:
            return {}

    def sample(self, fresh=False):
        """The pids of the worker and of its descendants (by a scan of /proc at most
        :data:`_SCAN_MAX_AGE_S` old, unless ``fresh``). Every descendant seen is remembered
        for as long as it runs, so that the worker's end kills it also when it left the group
        or its parent died. [] once the worker is reaped."""
        with self._lock:
            if self._reaped:
                return []
            now = _descendants(self.pid, 0.0 if fresh else _SCAN_MAX_AGE_S)
            known = self._descendants
            for pid in [pid for pid, proc in known.items()
                        if pid not in now and not proc.is_running()]:
                del known[pid]
            for pid in now:
                try:
                    proc = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    continue
                seen = known.get(pid)
                if seen is None or seen.create_time() != proc.create_time():
                    known[pid] = proc
            return [self.pid, *now]

    def stop(self, grace_s, asked=False):
        """Climb the ladder: (if ``asked`` to shut down: wait), SIGTERM to the group, wait,
        then :meth:`kill`. Returns the step that ended the worker: 'exited', 'terminated' or
        'killed'."""
        if not self.alive():
            how = "exited"
        else:
            self.sample(fresh=True)  # the last look at its descendants while it runs
            if asked and self._wait(grace_s):
                how = "exited"
            else:
                self._signal_group(signal.SIGTERM)
                how = "terminated" if self._wait(grace_s) else "killed"
        self.kill()
        return how

    def kill(self):
        """SIGKILL the worker's group and every descendant sampled, reap the worker and take
        in the rest of its output, at once. For a worker past its deadline or its memory limit,
        the last step of :meth:`stop`, and the end of a worker found dead; idempotent."""
        with self._lock:
            if self._reaped:
                return
            _signal_group(self.pid, signal.SIGKILL)
            for proc in self._descendants.values():
                try:
                    proc.kill()
                except psutil.Error:  # gone, or its pid reused: not ours
                    pass
            self._descendants.clear()
            self._reader.forget_exit(self._exit_watch)  # before the reap frees the pid
            self.proc.wait()
            self._reaped = True
            self._reader.remove(self._output)  # under the lock: a second kill() finds it done

    def _signal_group(self, sig):
        with self._lock:
            if not self._reaped:
                _signal_group(self.pid, sig)

    def _wait(self, timeout_s):
        """Whether the worker exits within ``timeout_s``; does not reap it."""
        with self._lock:
            if self._reaped:
                return True
            try:
                pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # no pidfd here: poll
                pidfd = None
        deadline = time.monotonic() + timeout_s
        try:
            while self.alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if pidfd is None:
                    time.sleep(min(remaining, 0.01))
                else:
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    poller.poll(remaining * 1e3)
            return True
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def __repr__(self):
        return f"<WorkerProcess {self.name} pid={self.pid} {describe_exit(self.returncode)}>"


_SCAN_MAX_AGE_S = 0.05  # one scan of /proc serves every worker sampled within this time
_scan_lock = threading.Lock()
_scan = (float("-inf"), {})  # (monotonic time, parent pid -> child pids) of the last scan


def _descendants(pid, max_age_s):
    """The pids of ``pid``'s descendants, by a scan of /proc at most ``max_age_s`` old. A scan
    costs ~10 us per process on the machine, so the supervisor's round shares one among all
    its workers."""
    global _scan
    with _scan_lock:
        taken, children = _scan
        if time.monotonic() - taken > max_age_s:
            children = collections.defaultdict(list)
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/stat", "rb") as stat_file:
                            stat = stat_file.read()
                    except OSError:  # gone meanwhile
                        continue
                    # Fields after the command (which may hold anything): state, ppid, ...
                    ppid = int(stat[stat.rindex(b")") + 2:].split(None, 2)[1])
                    children[ppid].append(int(entry.name))
            _scan = (time.monotonic(), children)
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # nobody left, or nobody we may signal
        pass


_LINE_LIMIT = 64 << 10  # bytes of one output line; the rest of a longer one is dropped
_TAIL_LINE_CHARS = 4096  # of a line kept for error messages
_CHUNK = 64 << 10  # bytes read at a time
_DRAIN_CHUNKS = 64  # at most this many chunks are taken in from a worker after its end


class _WorkerOutput:
    """What one worker writes (stdout and stderr, merged): cut into lines for its logger, the
    last :data:`_TAIL_LINES` kept (each cut at :data:`_TAIL_LINE_CHARS`) for error messages.
    Memory stays bounded whatever the worker writes: a line that grows past
    :data:`_LINE_LIMIT` bytes without a newline (a progress bar) goes out cut there, with a
    note, and the rest of it is dropped. Reading, cutting and closing happen under
    :attr:`lock`, by the output reader or by the worker's end."""

    def __init__(self, stream, logger):
        self._stream = stream  # the pipe's file object: it owns the descriptor
        self.fd = stream.fileno()
        os.set_blocking(self.fd, False)
        self.logger = logger
        self.lock = threading.Lock()
        self.open = True
        self._tail = collections.deque(maxlen=_TAIL_LINES)
        self._partial = bytearray()
        self._dropping = False  # the rest of an over-long line is being dropped

    def read(self, chunks):
        """Take in up to ``chunks`` chunks that are there, never waiting for more; returns
        whether the pipe is at its end (every writer gone)."""
        for _ in range(chunks):
            try:
                data = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                return False
            if not data:
                return True
            lines = data.split(b"\n")
            for piece in lines[:-1]:
                self._extend(piece)
                if not self._dropping:
                    self._emit(self._partial)
                self._partial.clear()
                self._dropping = False
            self._extend(lines[-1])
        return False

    def _extend(self, piece):
        if self._dropping:
            return
        self._partial += piece
        if len(self._partial) > _LINE_LIMIT:
            del self._partial[_LINE_LIMIT:]
            self._emit(self._partial, f" [... cut: line longer than {_LINE_LIMIT} bytes]")
            self._partial.clear()
            self._dropping = True

    def _emit(self, raw, note=""):
        line = raw.decode("utf-8", "replace") + note
        self._tail.append(line if len(line) <= _TAIL_LINE_CHARS
                          else line[:_TAIL_LINE_CHARS] + " [... cut]")
        self.logger.info("%s", line)

    def close(self):
        """Pass on a last line without a newline, and close the pipe."""
        if self._partial and not self._dropping:
            self._emit(self._partial)
        self._partial = bytearray()
        self.open = False
        self._stream.close()

    def tail(self):
        with self.lock:
            return "\n".join(self._tail)


class _ExitWatch:
    """A pidfd of a worker, readable once it exits, and whom to tell (``on_exit(worker)``)."""

    __slots__ = ("fd", "worker", "on_exit", "lock", "open")

    def __init__(self, fd, worker, on_exit):
        self.fd, self.worker, self.on_exit = fd, worker, on_exit
        self.lock = threading.Lock()
        self.open = True


class _OutputReader(PerProcess):
    """The host's one thread that reads the output of all its workers (one selector over
    their pipes), in chunks, never blocking on one pipe; a worker's pipe joins at its start
    and leaves at its end (:meth:`remove`), which does not wait for the end of file that a
    process the worker started may hold back.

    The same selector watches workers' exits (a pidfd each, :meth:`watch_exit`): a death is
    told at once to whom the worker was started for, so a call waiting on a dead worker needs
    no liveness slice to learn of it. Where pidfds are missing, the slices and the
    supervisor's round see deaths alone."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        threading.Thread(target=self._run, name="ope-output", daemon=True).start()

    def add(self, output):
        self._selector.register(output.fd, selectors.EVENT_READ, output)

    def watch_exit(self, worker, on_exit):
        """Call ``on_exit(worker)`` from this thread once ``worker`` exits (it must not wait);
        returns the watch for :meth:`forget_exit`, None without pidfds."""
        try:
            fd = os.pidfd_open(worker.pid)
        except (AttributeError, OSError):
            return None
        watch = _ExitWatch(fd, worker, on_exit)
        self._selector.register(fd, selectors.EVENT_READ, watch)
        return watch

    def forget_exit(self, watch):
        """Stop watching (idempotent; ``watch`` may be None)."""
        if watch is not None:
            with watch.lock:
                self._close_exit(watch)

    def _close_exit(self, watch):  # the caller holds watch.lock
        if watch.open:
            watch.open = False
            self._selector.unregister(watch.fd)
            os.close(watch.fd)

    def _exited(self, watch):
        with watch.lock:
            if not watch.open:
                return  # forgotten since the selector reported it
            self._close_exit(watch)
        try:
            watch.on_exit(watch.worker)
        except Exception:  # one model's trouble must not stop the others' output
            _log.exception("telling of the exit of a worker failed")

    def remove(self, output):
        """Take in what ``output`` holds now, never waiting for more, and close it."""
        with output.lock:
            if output.open:
                output.read(_DRAIN_CHUNKS)
                self._close(output)

    def _close(self, output):  # the caller holds output.lock
        self._selector.unregister(output.fd)
        output.close()

    def _run(self):
        while True:
            for key, _ in self._selector.select():
                output = key.data
                if type(output) is _ExitWatch:
                    self._exited(output)
                    continue
                with output.lock:
                    if not output.open:
                        continue  # closed since the selector reported it
                    try:
                        at_end = output.read(1)
                    except Exception:  # one pipe's trouble must not stop the others' output
                        _log.exception("reading the output of a worker failed")
                        at_end = True
                    if at_end:
                        self._close(output)


os.register_at_fork(after_in_child=_after_fork_in_child)


def child_environment(extra=None):
    """The environment a worker starts with: ours, unbuffered, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


_ARENA_MAPPING = f"/memfd:{SEGMENT_NAME}"  # how /proc/PID/smaps names an arena segment


def is_arena_mapping(path):
    """Whether a mapping of this path is the arena's: shared with the host, so not charged to
    the worker's memory limit."""
    return path.startswith(_ARENA_MAPPING)


def private_rss(pids, above=None):
    """Bytes of resident memory charged to ``pids`` (a worker and its descendants, as
    :meth:`WorkerProcess.sample` gives them): anonymous pages and shared-memory pages
    (``mmap(-1)``, memfd, /dev/shm), less the arena's mappings; file-backed pages (libraries,
    mapped model files) are not counted. The cheap figure, RssAnon + RssShmem of
    /proc/PID/status, includes the arena: only when it exceeds ``above`` (always, when
    ``above`` is None) is the arena's share, read from /proc/PID/smaps, taken off. None when
    none of ``pids`` is there."""
    found, total = [], 0
    for pid in pids:
        charged = _anonymous_and_shared(pid)
        if charged is not None:
            found.append(pid)
            total += charged
    if not found:
        return None
    if above is not None and total <= above:
        return total
    return total - sum(_arena_resident(pid) for pid in found)


def _anonymous_and_shared(pid):
    """RssAnon + RssShmem of ``pid`` in bytes; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            text = status.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    total = 0
    for line in text.splitlines():
        if line.startswith((b"RssAnon:", b"RssShmem:")):
            total += int(line.split()[1]) << 10
    return total


# In /proc/PID/smaps, the path of a shared-memory mapping ending its header line, and the first
# Rss field after it (the mapping's own).
_SHARED_MAPPING_PATH = re.compile(rb" ((?:/dev/shm/|/memfd:)[^\n]*)\n")
_RSS_FIELD = re.compile(rb"^Rss: +(\d+) kB", re.MULTILINE)


def _arena_resident(pid):
    """Bytes of the arena's mappings resident in ``pid``."""
    try:
        with open(f"/proc/{pid}/smaps", "rb") as smaps:
            text = smaps.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    total = 0
    for mapping in _SHARED_MAPPING_PATH.finditer(text):
        if is_arena_mapping(mapping.group(1).decode("utf-8", "replace")):
            total += int(_RSS_FIELD.search(text, mapping.end()).group(1)) << 10
    return total
