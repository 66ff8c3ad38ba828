"""Calls in flight out of process, and their futures.

A :class:`_Call` records what a call holds in the arena until its reply and how it ended;
:func:`_announce` completes the futures of settled calls once their model's locks are let go
(out_of_process.py has the lock order); a :class:`_CallFuture` collects its own reply in the
thread that asks for its result, and wakes the model's collector thread when it is waited on
in other ways.
"""

import concurrent.futures
import logging
import threading
import time
import typing

import ope_native
from ope.bridge.channel import corrupt_queue
from ope.errors import OpeError, ProtocolError

# Gives back the arena copies of a call's inputs and unseals the caller's arena arrays.
_release_inputs = ope_native.release_inputs
_log = logging.getLogger("ope")


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


class Collection(typing.NamedTuple):
    """How a future gets its call's reply from its model (ope/host/out_of_process.py):
    ``collect(call)`` receives until the call is settled and returns its outputs or raises
    its error; ``collect_until(call, until)`` receives until the call is settled or the
    monotonic time ``until`` (None: no limit) passes, if no other thread is receiving, and
    returns whether it could; ``wake()`` has the model's collector thread complete the calls
    in flight at once."""

    collect: typing.Callable
    collect_until: typing.Callable
    wake: typing.Callable


class _CallFuture(concurrent.futures.Future):
    """A Future whose result() collects the reply in the calling thread: waking a collector
    thread that would then wake this one costs a second wake-up per call, and on a VM each
    can cost far more than the call. A timed result() collects too, up to its timeout, if no
    other thread is receiving; waiting without collecting (done() polling, a done-callback,
    asyncio, concurrent.futures.wait or as_completed) wakes the model's collector thread
    instead. The call already runs in the worker, so the future cannot be cancelled.

    Done-callbacks are kept here, not in the Future, and run by :meth:`run_callbacks` once
    every future completed with this one is complete too (_announce). One Future internal is
    touched, on purpose: its list of waiters. concurrent.futures.wait and as_completed add to
    it, the only sign that a thread waits without asking for the result. Without it the
    collector would have to complete every call (a second wake-up per call, ~4 µs more per
    submit and result) or every call left alone for a grace period (futures.wait of four
    calls went from 76 µs to 4.8 ms with a 1 ms grace); both were measured and refused."""

    def __init__(self, collection):
        super().__init__()
        self._collection = collection
        self.call = None
        self._lock = threading.Lock()  # the hooks and callbacks below
        self._settle_hooks = []  # None once the future is complete
        self._callbacks = []  # None once they ran
        self._waiters = _WakingList(collection.wake)  # futures.wait/as_completed add here
        self.set_running_or_notify_cancel()

    def when_settled(self, hook):
        """ope's own bookkeeping: ``hook(failed)`` runs as the future completes, in the thread
        that collected the call, without waking the collector (see ope.host.model.when_settled);
        at once if it has."""
        with self._lock:
            if self._settle_hooks is not None:
                self._settle_hooks.append(hook)
                return
        hook(self.call.error is not None)

    def complete(self, outputs, error):
        """Run the settle hooks and complete the future, its done-callbacks left for
        run_callbacks; returns whether this thread did it: the first to get here does (the
        hooks taken under the lock decide), any other returns False at once."""
        with self._lock:
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

    def run_callbacks(self):
        """Run the done-callbacks added so far; later ones run as they are added."""
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
        for fn in callbacks or ():
            self._call_back(fn)

    def add_done_callback(self, fn):
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                fn = None
        if fn is not None:  # the callbacks ran: this one runs now, as for a done Future
            self._call_back(fn)
        elif not super().done():
            self._collection.wake()

    def _call_back(self, fn):
        try:
            fn(self)
        except Exception:  # as concurrent.futures does: a callback's error is logged, not raised
            _log.exception("exception calling callback for %r", self)

    def done(self):
        if super().done():
            return True
        call = self.call
        if call is not None and call.done:  # settled; its thread has not announced it yet
            _announce((call,))
            if super().done():
                return True
        self._collection.wake()  # someone polls: the reply must come without result()
        return False

    def result(self, timeout=None):
        return super().result(self._collect_or_wake(timeout))

    def exception(self, timeout=None):
        return super().exception(self._collect_or_wake(timeout))

    def _collect_or_wake(self, timeout):
        """Collect this call's reply in this thread if it can: always without a timeout;
        with one, up to it, if the receive lock is free now (else, or if the reply did not
        come in time, the collector thread completes the call). Returns what is left of
        ``timeout`` to wait for the future."""
        if super().done():
            return timeout
        collection, call = self._collection, self.call
        if timeout is None:
            try:
                collection.collect(call)
            except OpeError:
                pass  # set on this future too; raised by the caller
            return None
        until = time.monotonic() + timeout
        collection.collect_until(call, until)
        if call.done:
            _announce((call,))  # settled by a thread that has not announced it yet
        else:
            collection.wake()
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
