"""The part of an out-of-process model that owns its worker: starting one (after the restart
policy's backoff), receiving from it in liveness slices, failing and discarding it after a
fault, the supervisor's look at it, and the restart thread that replaces it.

:class:`WorkerLifecycle` is a mixin of OutOfProcessModel (out_of_process.py), whose
constructor sets the state these methods share and whose module docstring gives the lock
order they keep; burying a worker settles the calls sent to it through the model's
``_settle_until``.
"""

import logging
import os
import threading
import time
import weakref

import ope_native
from ope.bridge import protocol
from ope.bridge.channel import corrupt_queue
from ope.errors import (MemoryLimitExceeded, ModelBroken, ModelClosed, OpeError, ProtocolError,
                        WorkerCrashed, WorkerTimeout)
from ope.host.calls import _announce, _send_failure
from ope.host.standby import Incarnation
from ope.host.worker_process import (LIVENESS_SLICE_S, WorkerProcess, child_environment,
                                     describe_exit, private_rss)

__all__ = ["WorkerLifecycle"]


def _exit_teller(model):
    """What tells ``model`` of its workers' exits, holding it weakly: the output thread that
    calls it outlives models, and must not keep one alive."""
    ref = weakref.ref(model)

    def tell(worker):
        alive = ref()
        if alive is not None:
            alive._worker_exited(worker)
    return tell

_log = logging.getLogger("ope")
_MIB = 1 << 20
SEGMENT_QUIET_S = 1.0  # an input segment unused this long is given back (ope/bridge/arena.py)


class WorkerLifecycle:
    """The worker-owning methods of OutOfProcessModel (the module docstring)."""

    # -- worker lifecycle (callers hold both locks, or the receive lock for _fail) ----------

    def _start_worker(self):
        """Install a worker: a ready standby at once, else one started and loaded now. The
        caller holds both locks and has waited out the restart policy's backoff unless a
        standby is ready (_await_worker, _keep)."""
        self._check_not_broken()
        self._state = "starting"
        incarnation = self._standbys.take()
        if incarnation is None:
            try:
                incarnation = self._launch(lambda: self._closed)
            except BaseException as exc:
                self._failed(f"start failed: {type(exc).__name__}: {str(exc)[:200]}")
                raise
        self._install(incarnation)

    def _launch(self, stopping, standby=False):
        """Start a worker on a link of its own to the arena, check its protocol version and
        load the package in it; the current worker, if any, serves on meanwhile. Returns the
        Incarnation, not installed; raises what went wrong (ModelClosed once ``stopping()``),
        the worker stopped. A ``standby`` runs the package's test inputs, if it has them,
        before answering READY (its first real call then costs what later ones do). Takes
        the send lock for a few steps."""
        with self._send_lock:
            if self._closed:
                raise self._closed_error()
            link, spec, fds = self._arena.prepare()
            arena = self._arena
            # Everything a call of this worker needs but its own inputs, gathered once.
            session = ope_native.Session(link.channel.mapping, link.channel.out_q,
                                         link.channel.in_q, arena.encoding, arena.decoding,
                                         self._plain_checks, self._call_stats)
        args = ["--arena", spec, "--first-id", str(next(self._generations) << 20),
                "--host-pid", str(os.getpid()), "--max-bytes", str(arena.max_bytes)]
        try:
            worker = WorkerProcess(self.name, args, python=self._python,
                                   env=child_environment(self._env_vars), pass_fds=fds,
                                   on_exit=_exit_teller(self))
        except BaseException:
            link.close()
            raise
        finally:
            for fd in fds:  # the worker has its copies now
                os.close(fd)
        incarnation = Incarnation(worker, link, session, protocol.Conversation("host"))
        self._standbys.starting(worker, True, standby)
        try:
            deadline = time.monotonic() + self.load_timeout_s
            self._check_hello(incarnation, self._hear(incarnation, deadline, "starting", stopping))
            options = {**self._load_options, "warm_up": standby}
            message = [protocol.LOAD, self.package.path, options]
            incarnation.conversation.sent(message)
            if not session.send(protocol.pack(message), -1.0):
                raise _send_failure(None)
            ready = self._hear(incarnation, deadline, "loading the package", stopping)
            incarnation.conversation.received(ready)
            if ready[0] == protocol.ERROR:
                raise protocol.error_from_message(ready)
        except BaseException:
            incarnation.discard(self.stop_grace_s)
            raise
        finally:
            self._standbys.starting(worker, False, standby)
        incarnation.info = ready[1]
        return incarnation

    def _hear(self, incarnation, deadline, doing, stopping):
        """The next message of a worker being started (no tensors: none is due); raises
        instead of waiting on a dead or stuck one, or once ``stopping()``."""
        worker = incarnation.worker
        while True:
            remaining = min(LIVENESS_SLICE_S, deadline - time.monotonic())
            try:
                data = incarnation.session.receive(max(remaining, 0.0))
            except ValueError as exc:
                raise corrupt_queue("incoming", exc) from exc
            if data is not None:
                return protocol.unpack(data)
            if stopping():
                raise ModelClosed(f"model {self.name!r} was closed while {doing}")
            if not worker.alive():
                raise self._death_error(worker, doing)
            if time.monotonic() >= deadline:
                raise WorkerTimeout(f"worker of model {self.name!r} (pid {worker.pid}) did "
                                    f"not finish {doing} in time")

    def _take_over(self, standby):
        """Install ``standby`` after a fault; False, with it stopped, if it cannot be handed
        the host's newer segments (it died meanwhile)."""
        try:
            with self._send_lock:
                self._install(standby)
            return True
        except OpeError as exc:
            standby.worker.logger.warning("standby pid %d could not take over: %s",
                                          standby.worker.pid, exc)
            self._arena.disconnect()
            standby.discard(self.stop_grace_s)
            return False

    def _install(self, incarnation):
        """Make ``incarnation`` the serving worker: a pointer swap (the caller holds both
        locks and has discarded the previous worker)."""
        self._arena.adopt(incarnation.link)
        self._incarnation = incarnation
        self._worker, self._session = incarnation.worker, incarnation.session
        self._conversation, self._info = incarnation.conversation, incarnation.info
        self._state = "ready"

    def _check_not_broken(self):
        if self._policy.broken:
            self._state = "broken"
            raise ModelBroken(f"model {self.name!r} failed too often and is broken; "
                              f"history: {self._policy.describe()}")

    def _await_worker(self):
        """Start a worker for a call that found none, after the restart policy's backoff; with
        restart="eager" whichever of this and the restart thread comes first starts it. The
        caller holds no lock: the backoff is waited out with none held, then both are taken
        in order."""
        while self._worker is None:
            if self._closed:
                raise self._closed_error()
            self._check_not_broken()
            delay = self._policy.delay_s()
            if delay > 0 and not self._standbys.ready:
                self._closing.wait(delay)
                continue
            with self._recv_lock, self._send_lock:
                if self._worker is None and not self._closed:
                    self._start_worker()

    def _check_hello(self, incarnation, hello):
        if hello[0] == protocol.HELLO and hello[1] != protocol.VERSION:
            raise ProtocolError(
                f"worker runtime speaks protocol {hello[1]!r}, this host {protocol.VERSION}: "
                f"install the same ope version in the worker's environment")
        incarnation.conversation.received(hello)

    def _fail(self, reason):
        """Discard the worker after a fault (the caller holds the receive lock): stop it,
        record why; with restart="eager" the restart thread starts another. Closing the
        channel first wakes a sender blocked on a full queue, so the send lock comes free."""
        self._arena.channel.close()
        with self._send_lock:
            self._discard_worker(force=True)
        self._failed(reason)

    def _failed(self, reason):
        """Record a fault of the serving worker (now gone; the caller holds the receive
        lock); a ready standby takes over at once, else with restart="eager" the restart
        thread starts a worker."""
        self._policy.record(reason)
        if self._policy.broken:
            self._state = "broken"
            return
        standby = self._standbys.take()
        if standby is not None and self._take_over(standby):
            return
        self._state = "restarting"
        if self._wants_worker():
            self._wake_keeper()

    def _discard_worker(self, force):
        worker, self._worker = self._worker, None
        self._incarnation = None
        if worker is None:
            return
        if not force:
            try:
                self._send([protocol.SHUTDOWN], timeout_s=0.5)
            except OpeError:
                force = True
        how = worker.stop(self.stop_grace_s, asked=not force)
        if how != "exited" and not force:
            worker.logger.warning("worker pid %d did not shut down when asked: %s", worker.pid, how)
        self._arena.disconnect()

    def _send(self, message, timeout_s=-1.0, data=None):
        """Send ``message``; ``data`` is its encoding when the caller has it (a tensor frame)."""
        self._conversation.sent(message)
        try:
            sent = self._session.send(protocol.pack(message) if data is None else data, timeout_s)
        except ValueError as exc:
            raise _send_failure(exc) from exc
        if not sent:
            raise _send_failure(None)

    def _receive(self, deadline, doing, until=None):
        """The worker's next message; raises instead of waiting on a dead or stuck worker.
        ``until``: when the caller stops waiting (not a fault): None is returned then."""
        session, worker = self._session, self._worker
        while True:
            end = deadline if until is None or (deadline is not None and deadline < until) \
                else until
            remaining = LIVENESS_SLICE_S if end is None else min(
                LIVENESS_SLICE_S, end - time.monotonic())
            try:
                data = session.receive(max(remaining, 0.0))
            except ValueError as exc:
                raise corrupt_queue("incoming", exc) from exc
            if data is not None:
                return protocol.unpack(data, self._arena)
            if self._closed:
                raise ModelClosed(f"model {self.name!r} was closed while {doing}")
            if not worker.alive():
                raise self._worker_died(worker, doing)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._timed_out(worker, doing)
            if until is not None and now >= until:
                return None

    def _killed_for(self, worker):
        """Why the supervisor killed ``worker``, or None if it did not."""
        return self._kill_reasons.get(worker)

    def _replace_unusable_channel(self, error, worker):
        """After a send to ``worker`` met a closed or corrupt queue (the caller holds no lock,
        or both): replace it now if no other thread is receiving; else close the channel and
        kill it, and the receiving thread sees it die and replaces it. A worker installed
        since (a standby that took over) is left alone. Returns the error for the sender:
        ``error``, or the worker's death when it died (its channel closed by _worker_exited)."""
        if self._closed:
            return error
        dead = not worker.alive()
        if dead:
            error = self._death_error(worker, "sending a call")
        if self._recv_lock.acquire(False):
            settled = ()
            try:
                if self._worker is worker:
                    self._fail(self._death_reason(worker) if dead else f"protocol error: {error}")
                    # Calls sent to it before are lost with it; none may wait on it.
                    settled = self._lose_pending(type(error)(
                        f"call lost: the worker failed while it was in flight: {error}"))
            finally:
                self._recv_lock.release()
            _announce(settled)
        elif self._worker is worker:
            self._arena.channel.close()
            worker.kill()
        return error

    def _worker_exited(self, worker):
        """The output thread saw ``worker`` exit (worker_process._OutputReader). The serving
        worker's channel is closed, which wakes a call waiting on it at once, and the next
        call sent meets it closed: either finds the worker dead and raises its crash (a
        standby takes over then). A death with no call is left to the supervisor's round, as
        before. A standby's death goes to the pool. Never waits."""
        incarnation = self._incarnation
        if incarnation is not None and incarnation.worker is worker:
            if not self._closed:
                incarnation.link.channel.close()
        else:
            self._standbys.exited(worker, self._killed_for(worker))

    def _worker_died(self, worker, doing):
        error = self._death_error(worker, doing)
        self._fail(self._death_reason(worker))
        return error

    def _death_reason(self, worker):
        """Why ``worker`` died, for the restart policy's history."""
        return self._killed_for(worker) or f"crashed: {describe_exit(worker.returncode)}"

    def _death_error(self, worker, doing):
        """The error of ``worker`` found dead while ``doing``, once it is reaped."""
        worker.kill()  # what it started dies too; its exit status and last output are in
        how = f"worker of model {self.name!r} (pid {worker.pid}) {describe_exit(worker.returncode)}"
        reason = self._killed_for(worker)
        if reason:
            return MemoryLimitExceeded(f"{how} while {doing}: {reason}")
        return WorkerCrashed(f"{how} while {doing}", exitcode=worker.returncode,
                             stderr_tail=worker.output_tail())

    def _timed_out(self, worker, doing):
        self._fail(f"timed out while {doing}")
        return WorkerTimeout(f"worker of model {self.name!r} (pid {worker.pid}) did not finish "
                             f"{doing} in time; it was stopped and will be replaced")

    # -- supervision: the Supervisor thread looks, the restart thread acts ----------------

    def _supervise(self):
        """The supervisor's look at this model, every Supervisor.interval_s: the memory limit,
        and a worker that died while no call was receiving from it (a call that is sees the
        death itself); the same for its standbys. It never waits on this model: the receive
        lock is only tried, and whatever takes time (discarding, starting) is left to the
        restart thread and the standby pool's refill thread."""
        if self._closed:
            return
        self._standbys.supervise(self._check_memory)
        self._give_back_segments()
        worker = self._worker
        if worker is None:
            return
        self._check_memory(worker)
        if not worker.alive() and self._recv_lock.acquire(blocking=False):
            try:
                if self._worker is worker:
                    self._wake_keeper(dead=worker)
            finally:
                self._recv_lock.release()

    def _check_memory(self, worker):
        """Kill ``worker`` if it is past the memory limit; returns why it was killed, or None."""
        pids = worker.sample()
        if not pids or self.memory_limit_mb is None:
            return self._killed_for(worker)
        limit = self.memory_limit_mb * _MIB
        rss = private_rss(pids, above=limit)
        if rss is not None and rss > limit:
            self._kill_reasons[worker] = (f"memory limit exceeded: {rss / _MIB:.0f} MiB "
                                          f"resident outside the arena > "
                                          f"memory_limit_mb={self.memory_limit_mb}")
            worker.kill()
        return self._killed_for(worker)

    def _give_back_segments(self):
        """The arena's shrinking (ope/bridge/arena.py): forget the worker's segments it gave
        back, and give back our grown input segments that stayed empty, unless a sender holds
        the send lock (never waited for)."""
        self._arena.forget_retired()
        if self._arena.grown and self._send_lock.acquire(blocking=False):
            try:
                self._arena.retire_empty(0, SEGMENT_QUIET_S)
            finally:
                self._send_lock.release()

    def _wants_worker(self):
        """Whether the restart thread should start a worker now (restart="eager")."""
        return (self.restart == "eager" and self._worker is None and not self._closed
                and not self._policy.broken)

    def _wake_keeper(self, dead=None):
        """Have the restart thread bury ``dead`` (a worker seen dead while idle), and start a
        worker if the model wants one; starts the thread if none runs."""
        with self._keeper_lock:
            if dead is not None:
                self._dead = dead
            if not self._keeping and not self._closed:
                self._keeping = True
                self._keeper = threading.Thread(target=self._keep, daemon=True,
                                                name=f"ope-restart-{self.name}")
                self._keeper.start()

    def _keep(self):
        """The restart thread: buries a worker the supervisor saw dead, and with
        restart="eager" starts workers (after the policy's backoff) until one runs; ends when
        there is nothing left to do, or the model is broken or closed."""
        while True:
            with self._keeper_lock:
                dead, self._dead = self._dead, None
                if self._closed or (dead is None and not self._wants_worker()):
                    self._keeping = False
                    return
            if dead is None:
                self._closing.wait(self._policy.delay_s())
            if not self._take_recv_lock():
                continue  # closed: the loop ends
            settled = ()
            try:
                if dead is not None:
                    settled = self._bury(dead)
                elif self._wants_worker():
                    with self._send_lock:
                        self._start_worker()
            except OpeError:
                pass  # recorded in the policy; the next call reports it
            except Exception:  # this thread must go on, or nothing would restart the model
                _log.exception("restarting model %r failed", self.name)
            finally:
                self._recv_lock.release()
            _announce(settled)

    def _take_recv_lock(self):
        """Take the receive lock for the restart thread; False once the model is closed."""
        while not self._recv_lock.acquire(timeout=LIVENESS_SLICE_S):
            if self._closed:
                return False
        return True

    def _bury(self, dead):
        """Deal with ``dead``, a worker the supervisor saw dead while no call was receiving
        (the caller holds the receive lock): calls sent to it get what it answered before it
        died, or its crash; with none, it is discarded now. Returns the calls settled, to be
        announced once the lock is let go."""
        if self._worker is not dead:
            return ()  # a call saw the death first and dealt with it
        if self._pending:
            return self._settle_until(self._pending[-1])
        how = describe_exit(dead.returncode)
        dead.logger.warning("worker pid %d %s while idle", dead.pid, how)
        self._fail(self._killed_for(dead) or f"crashed while idle: {how}")
        return ()
