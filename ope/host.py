"""The host side of out-of-process execution: a Model whose calls run in a worker process.

A call writes each input into the arena (or, for an array from :meth:`empty`, only names where
it already is), sends the INFER frame naming them through the channel, and waits for the
RESULT, whose outputs come back as numpy views on the worker's blocks: no copy on the host
either way.
An output keeps its block (and the segment mapping) alive for as long as the caller holds it,
also after close() or a worker crash; the block returns to the worker's ring when dropped.

Everything the worker sends is untrusted: messages are checked against the protocol table and
every descriptor against the arena's bounds before a view is made (ope/protocol.py,
ope/arena.py), so a buggy worker produces a ProtocolError, not a crash of the host.

Faults (ope/supervisor.py has the mechanisms): a call waits in short slices and checks the
worker between them, so a crash raises WorkerCrashed within a slice; a call past its deadline
raises WorkerTimeout after the worker is stopped; a worker past its memory limit is killed by
the supervisor and the call raises MemoryLimitExceeded. Each fault discards the worker; the
next call (or the supervisor, with ``restart="eager"``) starts a fresh one under the restart
policy, and past its limit the model is broken (ModelBroken).
"""

import atexit
import collections
import concurrent.futures
import itertools
import os
import threading
import time
import weakref

import numpy as np
import psutil

import ope_native
from ope import protocol
from ope.arena import Arena, gc_segments
from ope.channel import corrupt_queue
from ope.errors import (MemoryLimitExceeded, ModelBroken, ModelClosed, OpeError, ProtocolError,
                        WorkerCrashed, WorkerTimeout)
from ope.model import Model, check_timeout
from ope.supervisor import (LIVENESS_SLICE_S, RestartPolicy, Supervisor, WorkerProcess,
                            child_environment, describe_exit, private_rss)

__all__ = ["OutOfProcessModel"]

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
_gc_once = threading.Lock()
_gc_done = False


def _collect_dead_owners_once():
    """Remove segments of hosts that died without cleaning up, once per host process."""
    global _gc_done
    with _gc_once:
        if not _gc_done:
            gc_segments()
            _gc_done = True


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
    (private RSS of the worker and its children), ``restart`` ("lazy" or "eager"),
    ``max_restarts`` and ``restart_window_s``, ``stop_grace_s`` (between SIGTERM and SIGKILL).
    """

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
        _collect_dead_owners_once()
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
        self._load_options = {"cpus": sorted(cpus) if cpus else None, "threads": threads}
        self._policy = RestartPolicy(max_restarts, restart_window_s)
        # Sending (and allocating from our rings) and receiving run concurrently, each under
        # its own lock; changing the worker takes both, always the receive lock first.
        self._send_lock = threading.RLock()
        self._recv_lock = threading.RLock()
        # The collector thread sleeps here until a future is waited on without collecting.
        self._collector_wakeup = threading.Condition(threading.Lock())
        self._pending = collections.deque()
        self._collector = None
        self._collector_wanted = False
        self._call_ids = itertools.count(1)
        # The spec's rules for ope_native.call_alone, which runs their success path.
        self._plain_checks = (self._input_plan.native_rows, self._output_plan.native_rows)
        self._generation = 0
        self._worker = None
        self._kill_reason = None
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
        _open_models.add(self)
        Supervisor.get().watch(self)

    # -- worker lifecycle (callers hold both locks, or the receive lock for _fail) ----------

    def _start_worker(self):
        """Start a worker, check its protocol version, and load the package in it."""
        if self._policy.broken:
            self._state = "broken"
            raise ModelBroken(f"model {self.name!r} failed too often and is broken; "
                              f"history: {self._policy.describe()}")
        time.sleep(self._policy.delay_s())
        self._state = "starting"
        self._generation += 1
        channel = self._arena.reset_channel()
        self._conversation = protocol.Conversation("host")
        self._kill_reason = None
        args = ["--arena", self._arena.prefix, "--first-id", str(self._generation << 20),
                "--host-pid", str(os.getpid()), "--max-bytes", str(self._arena.max_bytes)]
        self._worker = WorkerProcess(self.name, args, python=self._python,
                                     env=child_environment(self._env_vars))
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

    def _check_hello(self, hello):
        if hello[0] == protocol.HELLO and hello[1] != protocol.VERSION:
            raise ProtocolError(
                f"worker runtime speaks protocol {hello[1]!r}, this host {protocol.VERSION}: "
                f"install the same ope version in the worker's environment")
        self._conversation.received(hello)

    def _fail(self, reason):
        """Discard the worker after a fault: stop it, record why, maybe restart at once.
        Closing the channel first wakes a sender blocked on a full queue, so the send lock
        comes free."""
        self._arena.channel.close()
        with self._send_lock:
            self._discard_worker(force=True)
        self._policy.record(reason)
        self._state = "broken" if self._policy.broken else "restarting"
        if self.restart == "eager":
            Supervisor.get().poke()

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
        worker.reap()
        self._arena.forget_peer_segments()

    def _send(self, message, channel, timeout_s=-1.0, data=None):
        """Send ``message``; ``data`` is its encoding when the caller has it (a tensor frame)."""
        self._conversation.sent(message)
        if not channel.send(protocol.pack(message) if data is None else data, timeout_s):
            raise _send_failure(None)

    def _receive(self, deadline, doing):
        """The worker's next message; raises instead of waiting on a dead or stuck worker."""
        channel, worker = self._arena.channel, self._worker
        while True:
            remaining = LIVENESS_SLICE_S if deadline is None else min(
                LIVENESS_SLICE_S, deadline - time.monotonic())
            data = channel.receive(max(remaining, 0.0))
            if data is not None:
                return protocol.unpack(data, self._arena)
            if self._closed:
                raise ModelClosed(f"model {self.name!r} was closed while {doing}")
            if not worker.alive():
                raise self._worker_died(worker, doing)
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timed_out(worker, doing)

    def _worker_died(self, worker, doing):
        how = f"worker of model {self.name!r} (pid {worker.pid}) {describe_exit(worker.returncode)}"
        reason, tail = self._kill_reason, worker.output_tail()
        self._fail(reason or f"crashed: {describe_exit(worker.returncode)}")
        if reason:
            return MemoryLimitExceeded(f"{how} while {doing}: {reason}")
        return WorkerCrashed(f"{how} while {doing}", exitcode=worker.returncode, stderr_tail=tail)

    def _timed_out(self, worker, doing):
        self._fail(f"timed out while {doing}")
        return WorkerTimeout(f"worker of model {self.name!r} (pid {worker.pid}) did not finish "
                             f"{doing} in time; it was stopped and will be replaced")

    # -- supervision (called by the Supervisor thread) ----------------------------------

    def _supervise(self):
        worker = self._worker
        if worker is not None and self.memory_limit_mb is not None:
            rss = private_rss(worker.pid)
            if rss is not None and rss > self.memory_limit_mb * _MIB:
                self._kill_reason = (f"memory limit exceeded: {rss / _MIB:.0f} MiB private RSS "
                                     f"> memory_limit_mb={self.memory_limit_mb}")
                worker.kill()
        if self.restart == "eager" and self._worker is None and not self._closed \
                and self._state == "restarting" and self._recv_lock.acquire(blocking=False):
            try:
                with self._send_lock:
                    if self._worker is None and not self._closed:
                        self._start_worker()
            except OpeError:
                pass  # recorded in the policy; the next call reports it
            finally:
                self._recv_lock.release()

    # -- calls --------------------------------------------------------------------------
    #
    # A call is sent at once (INFER, under the send lock) and joins the pending queue;
    # replies come in the order calls were sent, and whoever needs a result (the caller of
    # infer, a future's result(), or the collector thread for futures waited on in other
    # ways) collects replies under the receive lock until its call is done, while
    # further calls can still be sent. A fault fails the call at the head of the queue with
    # its error and every call behind it, whose requests died with the worker.

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
                    step, result, bindings = self._call_alone(arrays, bindings, timeout_s)
            finally:
                self._send_lock.release()
            if step is _CHECKED:
                return result
            # Still under the receive lock: a reply received for the call is the next one.
            outputs = result if step is _RAW else self._collect(*result)
        finally:
            self._recv_lock.release()
        return self._validate_outputs(outputs, bindings)

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
        (_UNSENT, None, None), nothing sent, for the caller's inputs when they need Python's
        check or the model is not ready (the caller checks them and calls again); or
        (_QUEUED, (call, reply), bindings): anything else (a slow call, a reply that breaks
        the protocol, a model not ready) joins the queue and goes the general way, with the
        reply already received, if any. Raises the call's error."""
        if self._pending or self._state != "ready":
            if bindings is None:
                return _UNSENT, None, None
            return _QUEUED, (self._send_call(tensors, bindings, timeout_s, None), None), bindings
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
            raise _send_failure(reply)
        call = _Call.start(self, timeout_s, *held, bindings, None)
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
        while self._worker is None and not self._closed:
            with self._recv_lock, self._send_lock:
                if self._worker is None and not self._closed:
                    self._start_worker()
        with self._send_lock:
            if self._closed:
                raise ModelClosed(f"model {self.name!r} is closed")
            if self._worker is None:  # it failed since: start another
                return self._send_call(arrays, bindings, timeout_s, future)
            call_id = next(self._call_ids)
            frame, scratch, sealed = self._encode_inputs(call_id, arrays)
            call = _Call.start(self, timeout_s, scratch, sealed, bindings, future)
            try:
                self._send([protocol.INFER, call_id], self._arena.channel, data=frame)
            except OpeError:
                call.release_inputs()
                raise
            self._pending.append(call)
            self._state = "busy"
        return call

    def _collect(self, call, reply=None):
        """Collect replies until ``call`` is done; returns its raw outputs or raises its error.
        ``reply``: the next reply, when the caller has already received it.

        A reply is decoded (which may fail) before its call leaves the queue, and a call is
        announced to its future (which runs callbacks, and they may ask for other results,
        re-entering here) only after it left the queue."""
        with self._recv_lock:
            while not call.done:
                head = self._pending[0]
                if reply is None:
                    try:
                        reply = self._receive(head.deadline, "running a call")
                    except OpeError as exc:
                        reply = exc
                if self._take_reply(head, reply):
                    head.announce()
                reply = None
            call.announce()  # settled by an outer frame of this thread: announce it here
            if not self._pending and self._state == "busy":
                self._state = "ready"
        return call.result()

    def _take_reply(self, head, reply):
        """Settle ``head``, the oldest call in flight, with ``reply``: the worker's message, or
        the error that came instead of one. Returns whether it did; when the reply breaks the
        protocol, or the worker failed, every pending call fails instead (_fail_pending).
        A reply is decoded and checked before its call leaves the queue."""
        try:
            if isinstance(reply, OpeError):
                raise reply
            self._conversation.received(reply)
            outputs, error = self._read_reply(head, reply)
        except OpeError as exc:
            self._fail_pending(exc)
            return False
        self._pending.popleft()
        head.settle(outputs, error)
        return True

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
        """Fail the head call with ``exc`` and the calls queued behind it as lost with it.
        All are settled before any is announced, so a callback that asks for another of
        them gets its error instead of waiting on a worker that is gone."""
        if isinstance(exc, ProtocolError) and self._worker is not None:
            self._fail(f"protocol error: {exc}")
        calls = list(self._pending)
        self._pending.clear()
        for index, call in enumerate(calls):
            call.release_inputs()
            call.settle(None, exc if index == 0 else type(exc)(
                f"call lost: it was queued behind a call that failed with {exc}"))
        for call in calls:
            call.announce()

    def _wake_collector(self):
        """Have the collector thread complete the calls in flight: someone waits on a future
        without collecting its reply (a callback, asyncio, futures.wait, a timed result), or
        calls pile up that nobody collects."""
        with self._collector_wakeup:
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
            health.update(_process_usage(worker.pid))
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

    def _close(self):
        _open_models.discard(self)
        Supervisor.get().unwatch(self)
        for lock in (self._recv_lock, self._send_lock):
            if not lock.acquire(blocking=False):
                # A call is in flight or blocked sending (maybe in another thread): wake it;
                # it raises ModelClosed and lets go of the lock.
                self._arena.channel.close()
                lock.acquire()
        try:
            self._fail_pending(ModelClosed(f"model {self.name!r} was closed"))
            with self._collector_wakeup:
                self._collector_wakeup.notify_all()
            self._discard_worker(force=self._arena.channel.closed)
        finally:
            self._state = "closed"
            self._arena.close()
            self._send_lock.release()
            self._recv_lock.release()


class _Call:
    """One call in flight: what to release when it is done, and how it ended. Ending takes two
    steps: settle() records the outcome (under the receive lock); announce() then runs the
    settle hooks and completes the future, once, in whichever frame gets there first."""

    __slots__ = ("deadline", "scratch", "sealed", "bindings", "future", "done", "outputs",
                 "error", "announced")

    @classmethod
    def start(cls, model, timeout_s, scratch, sealed, bindings, future):
        """A call of ``model`` sent now; ``timeout_s`` None takes the model's default."""
        timeout_s = model.timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return cls(deadline, scratch, sealed, bindings, future)

    def __init__(self, deadline, scratch, sealed, bindings, future):
        self.deadline = deadline
        self.scratch = scratch
        self.sealed = sealed
        self.bindings = bindings
        self.future = future
        self.done = False
        self.outputs = None
        self.error = None
        self.announced = False

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

    def announce(self):
        if self.announced:
            return
        self.announced = True
        if self.future is not None:
            self.future.complete(self.outputs, self.error)


class _CallFuture(concurrent.futures.Future):
    """A Future whose result() collects the reply in the calling thread: waking a collector
    thread that would then wake this one costs a second wake-up per call, and on a VM each
    can cost far more than the call. Waiting without collecting (done() polling, a
    done-callback, asyncio, concurrent.futures.wait or as_completed, a timed result) wakes the
    model's collector thread instead. The call already runs in the worker, so the future
    cannot be cancelled."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.call = None
        self._settle_hooks = []
        self._waiters = _WakingList(model._wake_collector)  # futures.wait/as_completed add here
        self.set_running_or_notify_cancel()

    def when_settled(self, hook):
        """ope's own bookkeeping: ``hook(failed)`` runs as the call settles, in the collecting
        thread, without waking the collector (see ope.model.when_settled); at once if it has."""
        with self._condition:
            if self._settle_hooks is not None:
                self._settle_hooks.append(hook)
                return
        hook(self.call.error is not None)

    def complete(self, outputs, error):
        with self._condition:
            hooks, self._settle_hooks = self._settle_hooks, None
        for hook in hooks:
            hook(error is not None)
        if error is None:
            self.set_result(outputs)
        else:
            self.set_exception(error)

    def done(self):
        if super().done():
            return True
        self.model._wake_collector()  # someone polls: the reply must come without result()
        return False

    def result(self, timeout=None):
        self._collect_or_wake(timeout)
        return super().result(timeout)

    def exception(self, timeout=None):
        self._collect_or_wake(timeout)
        return super().exception(timeout)

    def add_done_callback(self, fn):
        super().add_done_callback(fn)
        if not super().done():
            self.model._wake_collector()

    def _collect_or_wake(self, timeout):
        if super().done():
            return
        if timeout is not None:
            self.model._wake_collector()
            return
        try:
            self.model._collect(self.call)
        except OpeError:
            pass  # set on this future too; raised by the caller


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


def _process_usage(pid):
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            memory = proc.memory_info()
            cpu = proc.cpu_times()
        return {"rss_bytes": memory.rss, "private_rss_bytes": private_rss(pid),
                "cpu_user_s": cpu.user, "cpu_system_s": cpu.system}
    except psutil.Error:  # the worker may be gone by now; health reports what it can
        return {}
