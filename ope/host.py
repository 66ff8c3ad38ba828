"""The host side of out-of-process execution: a Model whose calls run in a worker process.

A call writes each input into the arena (or, for an array from :meth:`empty`, only names where
it already is), sends the INFER frame naming them through the channel, and waits for the
RESULT, whose outputs come back as numpy views on the worker's blocks: no copy on the host
either way.
An output keeps its block (and the segment mapping) alive for as long as the caller holds it,
also after close() or a worker crash; the block returns to the worker's ring when dropped.

Everything the worker sends is untrusted: messages are checked against the protocol table and
every descriptor against the arena's bounds before a view is made (ope/bridge/protocol.py,
ope/bridge/arena.py), so a buggy worker produces a ProtocolError, not a crash of the host.

Faults (ope/supervisor.py has the mechanisms): a call waits in short slices and checks the
worker between them, so a crash raises WorkerCrashed within a slice; a call past its deadline
raises WorkerTimeout after the worker is stopped; a worker past its memory limit is killed by
the supervisor and the call raises MemoryLimitExceeded; a worker that dies while no call waits
on it is seen by the supervisor. Each fault discards the worker; the next call (or, with
``restart="eager"``, the model's restart thread) starts a fresh one under the restart policy,
whose backoff is waited out with no lock held; past its limit the model is broken
(ModelBroken).

Locks, outermost first. A thread takes them only in this order (it may skip any), and no path
waits for a lock above one it holds: a path that finds it needs one above (a sender that finds
no worker) lets go of what it holds and starts over from the top.

1. ``_recv_lock``: receiving from the worker and settling calls (the head of the pending
   queue, the conversation's replies, the restart policy's record), and, together with 2,
   replacing the worker (start, fail, discard, close).
2. ``_send_lock``: sending, allocating from our rings (encoding, :meth:`empty`), call ids, the
   tail of the pending queue.
3. ``_keeper_lock``: which restart thread runs and what it is asked; held for a few steps.
4. ``_collector_wakeup``: the collector thread's flags; held for a few steps. A future's own
   condition (concurrent.futures) may be held when it is taken (futures.wait adds waiters).

The supervisor thread takes none of these but 3, and the receive lock only with
``blocking=False``; it never waits on a model. Futures are completed, and so callbacks and
settle hooks run, only after the collecting thread let go of 1 and 2: a callback may call any
model (its own, another replica of a set) and wait for any result. A ReplicaSet's lock guards
its counters alone and is never held together with any of these. A worker is started only by
a caller that found none (``restart="lazy"``) or by the model's restart thread, which runs on
demand and ends when there is a worker again, the model is broken or closed.
"""

import atexit
import collections
import concurrent.futures
import itertools
import logging
import os
import threading
import time
import weakref

import numpy as np
import psutil

import ope_native
from ope.bridge import protocol
from ope.bridge.arena import Arena
from ope.bridge.channel import corrupt_queue
from ope.errors import (MemoryLimitExceeded, ModelBroken, ModelClosed, OpeError, ProtocolError,
                        WorkerCrashed, WorkerTimeout)
from ope.model import Model, check_timeout
from ope.supervisor import (LIVENESS_SLICE_S, RestartPolicy, Supervisor, WorkerProcess,
                            child_environment, describe_exit, private_rss)

__all__ = ["OutOfProcessModel"]

_log = logging.getLogger("ope")
_MIB = 1 << 20
_Block = ope_native.Block
_exchange_alone = ope_native.call_alone
_ANSWERED, _UNCHECKED = ope_native.CALL_ANSWERED, ope_native.CALL_UNCHECKED
_NOT_SENT, _NOT_PLAIN = ope_native.CALL_NOT_SENT, ope_native.CALL_NOT_PLAIN
# How far _call_alone took a call: its outputs checked, answered but not checked, queued, or
# not sent, the caller's inputs to go through Python's check first.
_CHECKED, _RAW, _QUEUED, _UNSENT = "checked", "raw", "queued", "unsent"
# Gives back the arena copies of a call's inputs and unseals the caller's arena arrays.
_release_inputs = ope_native.release_inputs
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_UNCOLLECTED_CALLS = 8  # calls in flight past which the collector thread steps in
_open_models = weakref.WeakSet()


@atexit.register
def _close_open_models():
    """Interpreter exit with models still open: stop their workers and unlink their arenas."""
    for model in list(_open_models):
        model.close()


class OutOfProcessModel(Model):
    """A model served by a worker process over shared memory. Create it with ``ope.load``.

    Options: ``timeout_s`` (default per-call deadline), ``load_timeout_s``, ``python`` (the
    worker's interpreter), ``env_vars`` (extra environment), ``cpus`` (CPU affinity of the
    worker), ``threads`` (intra-op threads: OMP/MKL/OpenBLAS and torch), ``arena_mb`` (initial ring size
    per direction), ``arena_max_mb`` (growth limit per direction), ``memory_limit_mb``
    (resident memory of the worker and its children, anonymous and shared, less the arena),
    ``restart`` ("lazy" or "eager"), ``max_restarts`` and ``restart_window_s``,
    ``stop_grace_s`` (between SIGTERM and SIGKILL).
    """

    _bound_to_process = True

    def __init__(self, package, *, timeout_s=None, load_timeout_s=120.0, python=None,
                 env_vars=None, cpus=None, threads=None, arena_mb=4, arena_max_mb=4096, memory_limit_mb=None,
                 restart="lazy", max_restarts=5, restart_window_s=60.0, stop_grace_s=1.0):
        if restart not in ("lazy", "eager"):
            raise ValueError(f"restart must be 'lazy' or 'eager', got {restart!r}")
        check_timeout(timeout_s)
        if load_timeout_s is None:
            raise TypeError("load_timeout_s must be a non-negative number of seconds, got None")
        check_timeout(load_timeout_s, "load_timeout_s")
        super().__init__(package)
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.restart = restart
        self.stop_grace_s = stop_grace_s
        self._python = python
        self._env_vars = dict(env_vars or {})
        if threads is not None:
            for var in _THREAD_VARIABLES:
                self._env_vars.setdefault(var, str(threads))
        # The manifest's digest pins every worker, restarts included, to the package read
        # here (ope/package/format.py): a folder replaced on disk since is refused, not served.
        self._load_options = {"cpus": sorted(cpus) if cpus else None, "threads": threads,
                              "manifest_digest": package.manifest_digest}
        self._policy = RestartPolicy(max_restarts, restart_window_s)
        # Sending (and allocating from our rings) and receiving run concurrently, each under
        # its own lock; changing the worker takes both (the module docstring has the order).
        self._send_lock = threading.RLock()
        self._recv_lock = threading.RLock()
        # The collector thread sleeps here until a future is waited on without collecting.
        self._collector_wakeup = threading.Condition(threading.Lock())
        self._pending = collections.deque()
        self._collector = None
        self._collector_wanted = False
        # The restart thread (_keep): runs while _keeping; _dead is a worker the supervisor
        # saw die with no call receiving, for it to bury. Until the constructor has started
        # the first worker, none runs: a failure there is raised, not mended.
        self._keeper_lock = threading.Lock()
        self._keeper = None
        self._keeping = True
        self._dead = None
        self._closing = threading.Event()  # set by close: ends backoff waits at once
        self._call_ids = itertools.count(1)
        # The spec's rules for ope_native.call_alone, which runs their success path.
        self._plain_checks = (self._input_plan.native_rows, self._output_plan.native_rows)
        self._generation = 0
        self._worker = None
        self._kill_reason = (None, None)  # (worker, why the supervisor killed it)
        self._info = {}
        self._state = "starting"
        self._arena = Arena.create(ring_bytes=arena_mb * _MIB, max_bytes=arena_max_mb * _MIB)
        try:
            with self._recv_lock, self._send_lock:
                self._start_worker()
        except BaseException:
            self._closed = True  # nothing for __del__ to close: the arena goes now
            self._arena.close()
            raise
        self._keeping = False
        _open_models.add(self)
        Supervisor.get().watch(self)

    # -- worker lifecycle (callers hold both locks, or the receive lock for _fail) ----------

    def _start_worker(self):
        """Start a worker, check its protocol version, and load the package in it. The caller
        has waited out the restart policy's backoff (_await_worker, _keep)."""
        self._check_not_broken()
        self._state = "starting"
        self._generation += 1
        spec, fds = self._arena.connect()
        channel = self._arena.channel
        self._conversation = protocol.Conversation("host")
        args = ["--arena", spec, "--first-id", str(self._generation << 20),
                "--host-pid", str(os.getpid()), "--max-bytes", str(self._arena.max_bytes)]
        try:
            self._worker = WorkerProcess(self.name, args, python=self._python,
                                         env=child_environment(self._env_vars), pass_fds=fds)
        finally:
            for fd in fds:  # the worker has its copies now
                os.close(fd)
        try:
            deadline = time.monotonic() + self.load_timeout_s
            self._check_hello(self._receive(deadline, "starting"))
            self._send([protocol.LOAD, self.package.path, self._load_options], channel)
            ready = self._receive(deadline, "loading the package")
            self._conversation.received(ready)
            if ready[0] == protocol.ERROR:
                raise protocol.error_from_message(ready)
        except BaseException as exc:
            self._fail(f"start failed: {type(exc).__name__}: {str(exc)[:200]}")
            raise
        self._info = ready[1]
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
            if delay > 0:
                self._closing.wait(delay)
                continue
            with self._recv_lock, self._send_lock:
                if self._worker is None and not self._closed:
                    self._start_worker()

    def _check_hello(self, hello):
        if hello[0] == protocol.HELLO and hello[1] != protocol.VERSION:
            raise ProtocolError(
                f"worker runtime speaks protocol {hello[1]!r}, this host {protocol.VERSION}: "
                f"install the same ope version in the worker's environment")
        self._conversation.received(hello)

    def _fail(self, reason):
        """Discard the worker after a fault (the caller holds the receive lock): stop it,
        record why; with restart="eager" the restart thread starts another. Closing the
        channel first wakes a sender blocked on a full queue, so the send lock comes free."""
        self._arena.channel.close()
        with self._send_lock:
            self._discard_worker(force=True)
        self._policy.record(reason)
        self._state = "broken" if self._policy.broken else "restarting"
        if self._wants_worker():
            self._wake_keeper()

    def _discard_worker(self, force):
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if not force:
            try:
                self._send([protocol.SHUTDOWN], self._arena.channel, timeout_s=0.5)
            except OpeError:
                force = True
        how = worker.stop(self.stop_grace_s, asked=not force)
        if how != "exited" and not force:
            worker.logger.warning("worker pid %d did not shut down when asked: %s", worker.pid, how)
        self._arena.disconnect()

    def _send(self, message, channel, timeout_s=-1.0, data=None):
        """Send ``message``; ``data`` is its encoding when the caller has it (a tensor frame)."""
        self._conversation.sent(message)
        if not channel.send(protocol.pack(message) if data is None else data, timeout_s):
            raise _send_failure(None)

    def _receive(self, deadline, doing, until=None):
        """The worker's next message; raises instead of waiting on a dead or stuck worker.
        ``until``: when the caller stops waiting (not a fault): None is returned then."""
        channel, worker = self._arena.channel, self._worker
        while True:
            end = deadline if until is None or (deadline is not None and deadline < until) \
                else until
            remaining = LIVENESS_SLICE_S if end is None else min(
                LIVENESS_SLICE_S, end - time.monotonic())
            data = channel.receive(max(remaining, 0.0))
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
        killed, reason = self._kill_reason
        return reason if killed is worker else None

    def _replace_unusable_channel(self, error):
        """After a send met a closed or corrupt queue (the caller holds no lock): replace the
        worker now if no other thread is receiving; else close the channel and kill the
        worker, and the receiving thread sees it die and replaces it."""
        if self._closed:
            return
        if self._recv_lock.acquire(False):
            try:
                if self._worker is not None:
                    self._fail(f"protocol error: {error}")
            finally:
                self._recv_lock.release()
            return
        worker = self._worker
        self._arena.channel.close()
        if worker is not None:
            worker.kill()

    def _worker_died(self, worker, doing):
        worker.kill()  # what it started dies too; its exit status and last output are in
        how = f"worker of model {self.name!r} (pid {worker.pid}) {describe_exit(worker.returncode)}"
        reason, tail = self._killed_for(worker), worker.output_tail()
        self._fail(reason or f"crashed: {describe_exit(worker.returncode)}")
        if reason:
            return MemoryLimitExceeded(f"{how} while {doing}: {reason}")
        return WorkerCrashed(f"{how} while {doing}", exitcode=worker.returncode, stderr_tail=tail)

    def _timed_out(self, worker, doing):
        self._fail(f"timed out while {doing}")
        return WorkerTimeout(f"worker of model {self.name!r} (pid {worker.pid}) did not finish "
                             f"{doing} in time; it was stopped and will be replaced")

    # -- supervision: the Supervisor thread looks, the restart thread acts ----------------

    def _supervise(self):
        """The supervisor's look at this model, every Supervisor.interval_s: the memory limit,
        and a worker that died while no call was receiving from it (a call that is sees the
        death itself). It never waits on this model: the receive lock is only tried, and
        whatever takes time (discarding, starting) is left to the restart thread."""
        worker = self._worker
        if worker is None or self._closed:
            return
        pids = worker.sample()
        if pids and self.memory_limit_mb is not None:
            limit = self.memory_limit_mb * _MIB
            rss = private_rss(pids, above=limit)
            if rss is not None and rss > limit:
                self._kill_reason = (worker, f"memory limit exceeded: {rss / _MIB:.0f} MiB "
                                             f"resident outside the arena > "
                                             f"memory_limit_mb={self.memory_limit_mb}")
                worker.kill()
        if not worker.alive() and self._recv_lock.acquire(blocking=False):
            try:
                if self._worker is worker:
                    self._wake_keeper(dead=worker)
            finally:
                self._recv_lock.release()

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

    # -- calls --------------------------------------------------------------------------
    #
    # A call is sent at once (INFER, under the send lock) and joins the pending queue;
    # replies come in the order calls were sent, and whoever needs a result (the caller of
    # infer, a future's result(), or the collector thread for futures waited on in other
    # ways) collects replies under the receive lock until its call is settled, while
    # further calls can still be sent; it announces the calls it settled (completing their
    # futures) once it let go of the lock. A fault fails the call at the head of the queue
    # with its error and every call behind it, whose requests died with the worker.

    def _infer(self, inputs, timeout_s):
        # The locks are taken by hand, positional arguments and no with-statement: on every
        # call that halves what they cost (~0.5 us on this VM).
        if self._pending or not self._recv_lock.acquire(False):
            return super()._infer(inputs, timeout_s)
        try:
            self._send_lock.acquire()
            try:
                step, result, bindings = self._call_alone(inputs, None, timeout_s)
                if step is _UNSENT:  # Python's check converts the inputs, or raises the error
                    arrays, bindings = self._validate_inputs(inputs)
                    step, result, _ = self._call_alone(arrays, bindings, timeout_s)
            finally:
                self._send_lock.release()
            if step is _CHECKED:
                return result
            if step is _QUEUED:  # still under the receive lock: a reply received is the call's
                call, reply = result
                settled = self._settle_until(call, reply)
        finally:
            self._recv_lock.release()
        if step is _UNSENT:  # not ready, or calls came first: the general way, no lock held
            return self._validate_outputs(self._run(arrays, bindings, timeout_s), bindings)
        if step is _QUEUED:
            _announce(settled)  # calls behind it that a fault failed
            result = call.result()
        return self._validate_outputs(result, bindings)

    def _run(self, arrays, bindings, timeout_s):
        return self._collect(self._send_call(arrays, bindings, timeout_s, None))

    def _call_alone(self, tensors, bindings, timeout_s):
        """A call with no other in flight (the caller holds both locks): send it and wait for
        its answer within the spin window, holding the send lock so that no other call comes
        between. The common short call ends here, in one crossing into ope_native
        (call_alone), and never enters the pending queue or the conversation: a lone INFER and
        its answer leave both as they found them.

        ``tensors`` are checked inputs with their ``bindings``, or with ``bindings`` None the
        caller's inputs: then C checks them and the outputs too, by the success path of the
        spec's rules, and does not send inputs that need Python's check.

        Returns (step, result, bindings): (_CHECKED, outputs, bindings) for outputs that
        passed the spec; (_RAW, outputs, bindings) for outputs still to be checked;
        (_UNSENT, None, None), nothing sent, when the caller's inputs need Python's check
        (the caller checks them and calls again) or the model is not ready or has calls in
        flight: then the caller goes the general way without the locks, as the call may
        have to wait for a worker, and a send under the receive lock could wait on a queue
        that only collecting replies, which needs that lock, would drain (a lone call sends
        with no call in flight: its queue is empty); or (_QUEUED, (call, reply), bindings):
        anything else (a slow call, a reply that breaks the protocol) joins the queue, with
        the reply already received, if any. Raises the call's error."""
        if self._pending or self._state != "ready":
            return _UNSENT, None, None
        call_id = next(self._call_ids)
        checks = self._plain_checks if bindings is None else None
        arena = self._arena
        channel = arena.channel
        self._state = "busy"  # for health(), as while calls are queued
        try:
            outcome, channel.spin_s, _, reply, held, checked = _exchange_alone(
                channel.mapping, channel.out_q, channel.in_q, channel.spin_s, call_id, tensors,
                arena.encoding, arena.decoding, checks, self._call_stats)
        except BaseException:
            self._state = "ready"
            raise
        if checks is not None:
            bindings = checked
        if outcome == _ANSWERED or outcome == _UNCHECKED:  # C counted the bytes copied
            self._state = "ready"
            self._policy.in_a_row = 0  # a served call ends a run of failures (_outcome)
            return _CHECKED if outcome == _ANSWERED and checks is not None else _RAW, reply, bindings
        if outcome == _NOT_PLAIN:
            self._state = "ready"
            return _UNSENT, None, None
        if outcome == _NOT_SENT:
            self._state = "ready"
            error = _send_failure(reply)
            if isinstance(error, ProtocolError):  # a channel that cannot carry calls: replace it
                self._fail(f"protocol error: {error}")
            raise error
        call = _Call(self._deadline(timeout_s), *held, bindings, None)
        try:
            reply = self._lone_reply(reply)
        except BaseException:  # interrupted: the reply is still due, to the queued call
            self._join_queue(call_id, call)
            raise
        if type(reply) is list and self._conversation.answers_alone(reply, call_id):
            self._state = "ready"
            call.release_inputs()
            outputs, error = self._outcome(reply)
            if error is not None:
                raise error
            return _RAW, outputs, bindings
        self._join_queue(call_id, call)
        return _QUEUED, (call, reply), bindings

    def _lone_reply(self, reply):
        """The worker's message that call_alone left to Python (bytes; None if none came in
        the spin window; or what receiving raised), decoded; a ProtocolError in its place if
        it is garbage. An interrupt is raised."""
        if type(reply) is bytes:
            try:
                return protocol.unpack(reply, self._arena)
            except ProtocolError as exc:
                return exc
        if isinstance(reply, ValueError):
            return corrupt_queue("incoming", reply)
        if reply is not None:
            raise reply
        return None

    def _join_queue(self, call_id, call):
        """Queue a lone call that was sent without telling the conversation (_call_alone)."""
        self._conversation.sent([protocol.INFER, call_id])
        self._pending.append(call)
        self._state = "busy"

    def _submit(self, arrays, bindings, timeout_s):
        future = _CallFuture(self)
        future.call = self._send_call(arrays, bindings, timeout_s, future)
        if len(self._pending) > _UNCOLLECTED_CALLS:
            # Calls submitted and never asked for: complete them before the reply queue
            # fills and the worker, then this host, block on it.
            self._wake_collector()
        return future

    @property
    def outstanding(self):
        """Calls sent to the worker and not yet collected (for load balancing replicas)."""
        return len(self._pending)

    def _send_call(self, arrays, bindings, timeout_s, future):
        """Send a call and queue it, first starting a worker if there is none. The caller
        holds no lock."""
        while True:
            if self._worker is None:
                self._await_worker()
            with self._send_lock:
                if self._closed:
                    raise self._closed_error()
                if self._worker is None:
                    continue  # it failed since; starting takes the receive lock: let go first
                call_id = next(self._call_ids)
                deadline = self._deadline(timeout_s)  # before encoding: nothing to give back
                frame, scratch, sealed = self._encode_inputs(call_id, arrays)
                call = _Call(deadline, scratch, sealed, bindings, future)
                try:
                    self._send([protocol.INFER, call_id], self._arena.channel, data=frame)
                except OpeError as exc:
                    call.release_inputs()
                    failed = exc
                else:
                    self._pending.append(call)
                    self._state = "busy"
                    return call
            if isinstance(failed, ProtocolError):
                self._replace_unusable_channel(failed)
            raise failed

    def _deadline(self, timeout_s):
        """When a call sent now is due; ``timeout_s`` None takes the model's default."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        return None if timeout_s is None else time.monotonic() + timeout_s

    def _collect(self, call):
        """Collect replies until ``call`` is settled; returns its raw outputs or raises its
        error. The caller holds no lock: callbacks of the calls settled here run once the
        receive lock is let go."""
        with self._recv_lock:
            settled = self._settle_until(call)
        _announce(settled)
        _announce((call,))  # settled by a thread that has not announced it yet
        return call.result()

    def _settle_until(self, call, reply=None, until=None):
        """Receive and settle replies until ``call`` is settled, or the monotonic time
        ``until`` passes first; the caller holds the receive lock. ``reply``: the next reply,
        when the caller has already received it. Returns the calls settled, in order, for the
        caller to announce once it let go of the lock."""
        settled = []
        while not call.done:
            head = self._pending[0]
            if reply is None:
                try:
                    reply = self._receive(head.deadline, "running a call", until)
                except OpeError as exc:
                    reply = exc
                if reply is None:
                    break  # the caller's wait ended first
            settled += self._take_reply(head, reply)
            reply = None
        if not self._pending and self._state == "busy":
            self._state = "ready"
        return settled

    def _take_reply(self, head, reply):
        """Settle ``head``, the oldest call in flight, with ``reply``: the worker's message, or
        the error that came instead of one. Returns the calls settled: ``head``, or when the
        reply breaks the protocol, or the worker failed, every pending call (_fail_pending).
        A reply is decoded and checked before its call leaves the queue."""
        try:
            if isinstance(reply, OpeError):
                raise reply
            self._conversation.received(reply)
            outputs, error = self._read_reply(head, reply)
        except OpeError as exc:
            return self._fail_pending(exc)
        self._pending.popleft()
        head.settle(outputs, error)
        return (head,)

    def _read_reply(self, call, reply):
        """(outputs, error) of ``call`` from the worker's reply (RESULT or ERROR)."""
        call.release_inputs()
        outputs, error = self._outcome(reply)
        if error is None and call.future is not None:  # infer() validates in Model.infer
            try:
                outputs = self._validate_outputs(outputs, call.bindings)
            except OpeError as exc:
                return None, exc
        return outputs, error

    def _outcome(self, reply):
        """(outputs, error) that a RESULT or ERROR reports; a served call ends a run of
        failures for the restart policy."""
        self._policy.in_a_row = 0
        if reply[0] == protocol.ERROR:
            return None, protocol.error_from_message(reply)
        self._call_stats.copied(0, reply[3])
        return reply[2], None

    def _fail_pending(self, exc):
        """Fail the head call with ``exc`` and the calls queued behind it as lost with it;
        returns them, settled, for the caller to announce (all are settled before any is, so
        a callback that asks for another of them gets its error instead of waiting on a
        worker that is gone)."""
        if isinstance(exc, ProtocolError) and self._worker is not None:
            self._fail(f"protocol error: {exc}")
        calls = list(self._pending)
        self._pending.clear()
        for index, call in enumerate(calls):
            call.release_inputs()
            call.settle(None, exc if index == 0 else type(exc)(
                f"call lost: it was queued behind a call that failed with {exc}"))
        return calls

    def _wake_collector(self):
        """Have the collector thread complete the calls in flight: someone waits on a future
        without collecting its reply (a callback, asyncio, futures.wait, a timed result), or
        calls pile up that nobody collects."""
        with self._collector_wakeup:
            if self._closed:
                return
            if self._collector is None:
                self._collector = threading.Thread(target=self._collect_forever, daemon=True,
                                                   name=f"ope-collector-{self.name}")
                self._collector.start()
            self._collector_wanted = True
            self._collector_wakeup.notify()

    def _collect_forever(self):
        """Each time it is woken, complete the calls in flight then, and sleep again."""
        while True:
            with self._collector_wakeup:
                while not (self._collector_wanted and self._pending) and not self._closed:
                    self._collector_wakeup.wait()
                if self._closed and not self._pending:
                    return
                self._collector_wanted = False
                last = self._pending[-1] if self._pending else None
            if last is not None:
                try:
                    self._collect(last)
                except OpeError:
                    pass  # delivered through the calls' futures

    def _encode_inputs(self, call_id, arrays):
        """The INFER frame of ``arrays``; copies those not already in the arena.

        Returns (frame, scratch blocks to release after the call, arrays sealed for the
        duration of the call)."""
        frame, copied, scratch, sealed = self._arena.encode(protocol.INFER, call_id, arrays,
                                                            in_place=True)
        self._call_stats.copied(copied, 0)
        return frame, scratch, sealed

    def holds(self, array):
        """Whether ``array`` lies in this model's arena, as arrays from :meth:`empty` do."""
        block = _arena_block(array)
        return block is not None and self._arena.owns(block.mapping)

    # -- arena buffers ------------------------------------------------------------------

    def empty(self, name, shape):
        """A writable array for input ``name`` that lives in the worker's arena: passing it to
        infer copies nothing. Its space returns to the arena when the last view is dropped."""
        dtype = self._empty_spec(name, shape).numpy_dtype
        shape = tuple(shape)
        with self._send_lock:
            _, block = self._arena.new_block(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return np.ndarray(shape, dtype, block)

    def seal(self, array):
        """Make ``array`` final: read-only from now on (its arena block refuses new writable
        views too). Returns it."""
        array.flags.writeable = False
        block = _arena_block(array)
        if block is not None:
            block.seal()
        return array

    # -- visibility and teardown --------------------------------------------------------

    def health(self):
        health = super().health()
        worker = self._worker
        health.update(mode="out_of_process", state="closed" if self._closed else self._state,
                      pid=worker.pid if worker else None, restarts=len(self._policy.history),
                      failures=[{"time": t, "reason": r} for t, _, r in self._policy.history])
        if worker is not None:
            health.update(_process_usage(worker))
        return health

    def stats(self):
        stats = super().stats()
        worker = self._worker
        stats.update(
            arena_bytes_in_use=self._arena.used_bytes(),
            arena_high_water=self._arena.high_water_bytes(),
            arena_bytes_reserved=self._arena.own_bytes,
            pid=worker.pid if worker else None, restarts=len(self._policy.history),
            state="closed" if self._closed else self._state, worker=dict(self._info))
        return stats

    def _disown(self):
        super()._disown()
        self._state = "closed"  # the lone call's fast path checks only the state

    def _close(self):
        _open_models.discard(self)
        Supervisor.get().unwatch(self)
        self._closing.set()
        for lock in (self._recv_lock, self._send_lock):
            if not lock.acquire(blocking=False):
                # A call is in flight, a worker starting, or a sender blocked (maybe in
                # another thread): wake it; it raises ModelClosed and lets go of the lock.
                self._arena.channel.close()
                lock.acquire()
        settled = ()
        try:
            settled = self._fail_pending(ModelClosed(f"model {self.name!r} was closed"))
            with self._collector_wakeup:
                self._collector_wakeup.notify_all()
            self._discard_worker(force=self._arena.channel.closed)
        finally:
            self._state = "closed"
            self._arena.close()
            self._send_lock.release()
            self._recv_lock.release()
        _announce(settled)
        # Both threads end on their own once closed; waiting for them leaves none behind.
        with self._keeper_lock, self._collector_wakeup:
            helpers = [self._keeper, self._collector]
        for thread in helpers:
            if thread is not None and thread is not threading.current_thread():
                thread.join()


class _Call:
    """One call in flight: what to release when it is done, and how it ended. Ending takes two
    steps: settle() records the outcome (under the receive lock); _announce() then completes
    the future, with no lock held, once, in whichever thread gets there first."""

    __slots__ = ("deadline", "scratch", "sealed", "bindings", "future", "done", "outputs",
                 "error")

    def __init__(self, deadline, scratch, sealed, bindings, future):
        self.deadline = deadline
        self.scratch = scratch
        self.sealed = sealed
        self.bindings = bindings
        self.future = future
        self.done = False
        self.outputs = None
        self.error = None

    def release_inputs(self):
        _release_inputs(self.scratch, self.sealed)
        self.scratch = self.sealed = ()

    def settle(self, outputs, error):
        self.done, self.outputs, self.error = True, outputs, error

    def result(self):
        """The outputs of a settled call, or its error raised."""
        if self.error is not None:
            raise self.error
        return self.outputs


def _announce(calls):
    """Complete the futures of settled ``calls`` (the caller holds no lock of their model):
    first every future, then their done-callbacks, so that a callback finds each call settled
    with it done, whatever it waits on (result, done, futures.wait). A call whose future
    another thread completes, or has completed, is left to it."""
    completed = [call.future for call in calls
                 if call.future is not None and call.future.complete(call.outputs, call.error)]
    for future in completed:
        future.run_callbacks()


class _CallFuture(concurrent.futures.Future):
    """A Future whose result() collects the reply in the calling thread: waking a collector
    thread that would then wake this one costs a second wake-up per call, and on a VM each
    can cost far more than the call. A timed result() collects too, up to its timeout, if no
    other thread is receiving; waiting without collecting (done() polling, a done-callback,
    asyncio, concurrent.futures.wait or as_completed) wakes the model's collector thread
    instead. The call already runs in the worker, so the future cannot be cancelled."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.call = None
        self._settle_hooks = []
        self._waiters = _WakingList(model._wake_collector)  # futures.wait/as_completed add here
        self.set_running_or_notify_cancel()

    def when_settled(self, hook):
        """ope's own bookkeeping: ``hook(failed)`` runs as the future completes, in the thread
        that collected the call, without waking the collector (see ope.model.when_settled);
        at once if it has."""
        with self._condition:
            if self._settle_hooks is not None:
                self._settle_hooks.append(hook)
                return
        hook(self.call.error is not None)

    def complete(self, outputs, error):
        """Run the settle hooks and complete the future, its done-callbacks left for
        run_callbacks; returns whether this thread did it: the first to get here does (the
        hooks taken under the condition decide), any other returns False at once."""
        with self._condition:
            hooks, self._settle_hooks = self._settle_hooks, None
        if hooks is None:
            return False
        for hook in hooks:
            hook(error is not None)
        if error is None:
            self.set_result(outputs)
        else:
            self.set_exception(error)
        return True

    def _invoke_callbacks(self):
        """set_result's own run of the done-callbacks: left out, run_callbacks does it."""

    def run_callbacks(self):
        super()._invoke_callbacks()

    def done(self):
        if super().done():
            return True
        call = self.call
        if call is not None and call.done:  # settled; its thread has not announced it yet
            _announce((call,))
            if super().done():
                return True
        self.model._wake_collector()  # someone polls: the reply must come without result()
        return False

    def result(self, timeout=None):
        return super().result(self._collect_or_wake(timeout))

    def exception(self, timeout=None):
        return super().exception(self._collect_or_wake(timeout))

    def add_done_callback(self, fn):
        super().add_done_callback(fn)
        if not super().done():
            self.model._wake_collector()

    def _collect_or_wake(self, timeout):
        """Collect this call's reply in this thread if it can: always without a timeout;
        with one, up to it, if the receive lock is free now (else, or if the reply did not
        come in time, the collector thread completes the call). Returns what is left of
        ``timeout`` to wait for the future."""
        if super().done():
            return timeout
        model, call = self.model, self.call
        if timeout is None:
            try:
                model._collect(call)
            except OpeError:
                pass  # set on this future too; raised by the caller
            return None
        until = time.monotonic() + timeout
        if model._recv_lock.acquire(blocking=False):
            try:
                settled = model._settle_until(call, until=until)
            finally:
                model._recv_lock.release()
            _announce(settled)
        if call.done:
            _announce((call,))  # settled by a thread that has not announced it yet
        else:
            model._wake_collector()
        return max(0.0, until - time.monotonic())


class _WakingList(list):
    """A future's list of waiters that wakes the collector when one is added."""

    def __init__(self, wake):
        super().__init__()
        self._wake = wake

    def append(self, waiter):
        super().append(waiter)
        self._wake()


def _send_failure(exc):
    """The error for a message that could not be sent: ``exc`` None when the queue is closed
    (or stayed full), ope_native's ValueError when it is corrupt, else an interrupt."""
    if exc is None:
        return ProtocolError("the control channel to the worker is closed or full")
    return corrupt_queue("outgoing", exc) if isinstance(exc, ValueError) else exc


def _arena_block(array):
    """The ope_native.Block under ``array`` (through any chain of views), or None."""
    base = array.base
    while type(base) is np.ndarray:
        base = base.base
    return base if type(base) is _Block else None


def _process_usage(worker):
    try:
        proc = psutil.Process(worker.pid)
        with proc.oneshot():
            memory = proc.memory_info()
            cpu = proc.cpu_times()
        return {"rss_bytes": memory.rss, "private_rss_bytes": private_rss(worker.sample()),
                "cpu_user_s": cpu.user, "cpu_system_s": cpu.system}
    except psutil.Error:  # the worker may be gone by now; health reports what it can
        return {}
