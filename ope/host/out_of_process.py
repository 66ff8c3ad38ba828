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

Faults (worker_process.py and supervisor.py have the mechanisms, lifecycle.py the model's side
of them): a call waits in short slices and checks the worker between them, so a crash raises
WorkerCrashed within a slice; a call past its deadline raises WorkerTimeout after the worker
is stopped; a worker past its memory limit is killed by the supervisor and the call raises
MemoryLimitExceeded; a worker that dies while no call waits on it is seen by the supervisor.
Each fault discards the worker; the next call (or, with
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
import functools
import itertools
import threading
import time
import weakref

import numpy as np

import ope_native
from ope.bridge import protocol
from ope.bridge.arena import Arena, block_under
from ope.bridge.channel import corrupt_queue
from ope.errors import ModelClosed, OpeError, ProtocolError
from ope.host.calls import Collection, _announce, _Call, _CallFuture, _send_failure
from ope.host.lifecycle import WorkerLifecycle
from ope.host.model import Model, check_timeout
from ope.host.standby import StandbyPool
from ope.host.supervisor import RestartPolicy, Supervisor

__all__ = ["OutOfProcessModel"]

_MIB = 1 << 20
_ANSWERED, _UNCHECKED = ope_native.CALL_ANSWERED, ope_native.CALL_UNCHECKED
_NOT_SENT, _NOT_PLAIN = ope_native.CALL_NOT_SENT, ope_native.CALL_NOT_PLAIN
# How far _call_alone took a call: its outputs checked, answered but not checked, queued, or
# not sent, the caller's inputs to go through Python's check first.
_CHECKED, _RAW, _QUEUED, _UNSENT = "checked", "raw", "queued", "unsent"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_UNCOLLECTED_CALLS = 8  # calls in flight past which the collector thread steps in
_open_models = weakref.WeakSet()


@atexit.register
def _close_open_models():
    """Interpreter exit with models still open: stop their workers and unlink their arenas."""
    for model in list(_open_models):
        model.close()


class OutOfProcessModel(WorkerLifecycle, Model):
    """A model served by a worker process over shared memory. Create it with ``ope.load``.

    Options: ``timeout_s`` (default per-call deadline), ``load_timeout_s``, ``python`` (the
    worker's interpreter), ``env_vars`` (extra environment), ``cpus`` (CPU affinity of the
    worker), ``threads`` (intra-op threads: OMP/MKL/OpenBLAS and torch), ``device`` (where the
    runner puts the model, as the worker numbers its GPUs), ``arena_mb`` (initial ring size
    per direction), ``arena_max_mb`` (growth limit per direction), ``memory_limit_mb``
    (resident memory of the worker and its children, anonymous and shared, less the arena),
    ``restart`` ("lazy" or "eager"), ``max_restarts`` and ``restart_window_s``,
    ``stop_grace_s`` (between SIGTERM and SIGKILL), ``standby`` (loaded workers kept idle
    to take over at once after a fault, ope/host/standby.py).
    """

    _bound_to_process = True

    def __init__(self, package, *, timeout_s=None, load_timeout_s=120.0, python=None,
                 env_vars=None, cpus=None, threads=None, device=None, arena_mb=4,
                 arena_max_mb=4096, memory_limit_mb=None, restart="lazy", max_restarts=5,
                 restart_window_s=60.0, stop_grace_s=1.0, standby=0):
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
                              "device": device, "manifest_digest": package.manifest_digest}
        self._policy = RestartPolicy(max_restarts, restart_window_s)
        self._closing = threading.Event()  # set by close: ends backoff waits at once
        self._standbys = StandbyPool(standby, functools.partial(self._launch, standby=True),
                                     self._policy, self._closing,
                                     max_restarts, restart_window_s, stop_grace_s)
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
        self._call_ids = itertools.count(1)
        # The spec's rules for ope_native.Session.call, which runs their success path.
        self._plain_checks = (self._input_plan.native_rows, self._output_plan.native_rows)
        self._generations = itertools.count(1)  # of workers started: their segment ids
        self._worker = None
        self._session = None  # ope_native.Session with the current worker (_install)
        self._incarnation = None  # the current worker with its link and session
        self._conversation = None
        # Workers the supervisor killed, and why (the memory limit).
        self._kill_reasons = weakref.WeakKeyDictionary()
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
        self._standbys.start()

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
        (Session.call), and never enters the pending queue or the conversation: a lone INFER and
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
        check = bindings is None
        self._state = "busy"  # for health(), as while calls are queued
        try:
            outcome, reply, held, checked = self._session.call(call_id, tensors, check)
        except BaseException:
            self._state = "ready"
            raise
        if check:
            bindings = checked
        if outcome == _ANSWERED or outcome == _UNCHECKED:  # C counted the bytes copied
            self._state = "ready"
            self._policy.in_a_row = 0  # a served call ends a run of failures (_outcome)
            return _CHECKED if outcome == _ANSWERED and check else _RAW, reply, bindings
        if outcome == _NOT_PLAIN:
            self._state = "ready"
            return _UNSENT, None, None
        if outcome == _NOT_SENT:
            self._state = "ready"
            error = _send_failure(reply)
            if isinstance(error, ProtocolError):  # a channel that cannot carry calls: replace it
                error = self._replace_unusable_channel(error, self._worker)
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
        """The worker's message that Session.call left to Python (bytes; None if none came in
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
        # Made per future: bound methods kept by the model would make it a reference cycle.
        future = _CallFuture(Collection(self._collect, self._collect_until, self._wake_collector))
        future.call = self._send_call(arrays, bindings, timeout_s, future)
        if len(self._pending) > _UNCOLLECTED_CALLS:
            # Calls submitted and never asked for: complete them before the reply queue
            # fills and the worker, then this host, block on it.
            self._wake_collector()
        return future

    @property
    def state(self):
        """What the model is doing: "starting", "ready", "busy", "restarting", "broken" or
        "closed" (as health() reports it)."""
        return self._state

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
                worker = self._worker
                if worker is None:
                    continue  # it failed since; starting takes the receive lock: let go first
                call_id = next(self._call_ids)
                deadline = self._deadline(timeout_s)  # before encoding: nothing to give back
                frame, scratch, sealed = self._encode_inputs(call_id, arrays)
                call = _Call(deadline, scratch, sealed, bindings, future)
                try:
                    self._send([protocol.INFER, call_id], data=frame)
                except OpeError as exc:
                    call.release_inputs()
                    failed = exc
                else:
                    self._pending.append(call)
                    self._state = "busy"
                    return call
            if isinstance(failed, ProtocolError):
                failed = self._replace_unusable_channel(failed, worker)
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
        return self._lose_pending(exc)

    def _lose_pending(self, exc):
        """Settle every call in flight as failed with ``exc`` (_fail_pending), the worker they
        were sent to being gone already; the caller holds the receive lock."""
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
            if last is not None:  # no lock of the model is held here (the order above)
                try:
                    self._collect(last)
                except OpeError:
                    pass  # delivered through the calls' futures

    def _collect_until(self, call, until):
        """Collect up to ``call``, or until the monotonic time ``until``, unless another thread
        is receiving: then returns False."""
        if not self._recv_lock.acquire(blocking=False):
            return False
        try:
            settled = self._settle_until(call, until=until)
        finally:
            self._recv_lock.release()
        _announce(settled)
        return True

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
        block = block_under(array)
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
        block = block_under(array)
        if block is not None:
            block.seal()
        return array

    # -- visibility and teardown --------------------------------------------------------

    def health(self):
        health = {**super().health(), **self._facts(), "mode": "out_of_process",
                  "failures": [{"time": t, "reason": r} for t, _, r in self._policy.history]}
        return {**health, **(worker.usage() if (worker := self._worker) is not None else {})}

    def stats(self):
        return {**super().stats(), **self._facts(), "worker": dict(self._info),
                "arena_bytes_in_use": self._arena.used_bytes(),
                "arena_high_water": self._arena.high_water_bytes(),
                "arena_bytes_reserved": self._arena.own_bytes,
                "arena_bytes_worker": self._arena.peer_bytes}

    def _facts(self):
        """What health() and stats() both report."""
        worker = self._worker
        return {"state": "closed" if self._closed else self._state,
                "pid": worker.pid if worker else None, "restarts": len(self._policy.history),
                "standby": self._standbys.describe()}

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
            self._session = None  # it holds the control segment's mapping and the codec's state
            self._send_lock.release()
            self._recv_lock.release()
        _announce(settled)
        self._standbys.close()  # with no lock held: a standby's start may be waiting for one
        # Both threads end on their own once closed; waiting for them leaves none behind.
        with self._keeper_lock, self._collector_wakeup:
            helpers = [self._keeper, self._collector]
        for thread in helpers:
            if thread is not None and thread is not threading.current_thread():
                thread.join()

