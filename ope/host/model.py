"""The loaded-model handle that both modes implement (in_process.py, out_of_process.py).

Design idea: :meth:`Model.infer` is written once, in the base class: check the model is
open, validate the inputs against the spec, ``_run`` them, validate the outputs, count the
call. Each execution mode only implements how tensors get to the model and back
(``_run``, ``empty``, ``seal``, ``_close``), so both modes accept and refuse exactly the
same calls with exactly the same errors, and a failed call never leaves a model unusable:
nothing in ``infer`` holds state across the failure. The one shortcut: out of process, a call
with no other in flight runs the checks' success path in C together with the exchange
(``_infer`` in ope/host/out_of_process.py), and anything that path does not pass comes back
to these checks.
"""

import abc
import asyncio
import concurrent.futures
import logging
import numbers
import os
import time
import weakref


import ope_native
from ope.errors import ModelClosed, OpeError, SpecError, WorkerError
from ope.spec import check_inputs, check_outputs, check_shape, input_plan, output_plan

__all__ = ["Model", "when_settled", "check_timeout"]

_log = logging.getLogger("ope")
_now_ns = time.monotonic_ns  # the clock ope_native.CallStats reads

# Latency percentiles come from the most recent calls only, so stats() stays O(window).
_LATENCY_WINDOW = 4096

# Models whose workers, arena and threads belong to the process that loaded them. A forked
# child inherits copies of their handles, not the models: there each is closed for good, and
# closing or dropping it only drops the child's own mappings (Model._disown).
_process_bound = weakref.WeakSet()


def _disown_in_child():
    for model in list(_process_bound):
        model._disown()
    _process_bound.clear()


os.register_at_fork(after_in_child=_disown_in_child)


class Model(abc.ABC):
    """A loaded model. Use as a context manager, or call :meth:`close`."""

    # Whether the model lives in resources of the loading process (a worker, shared memory)
    # that a forked child must not touch.
    _bound_to_process = False

    def __init__(self, package):
        self.package = package
        self.name = package.name
        self.inputs = package.inputs
        self.outputs = package.outputs
        self._input_plan = input_plan(self.inputs)
        self._output_plan = output_plan(self.outputs)
        self._closed = False
        self._closed_because = None  # why calls are refused, when not close()
        self._call_stats = ope_native.CallStats(_LATENCY_WINDOW)
        if self._bound_to_process:
            self._owner_pid = os.getpid()
            _process_bound.add(self)

    def __repr__(self):
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.name!r} ({state})>"

    def infer(self, inputs, *, timeout_s=None):
        """Run the model on ``inputs`` (name -> numpy array, CPU torch tensor, or list of str
        for string tensors); returns outputs by name as numpy arrays. SpecError before
        running if an input does not match the spec, ModelError if the model raised.
        ``timeout_s``: this call's deadline in seconds (None: the model's default; it applies
        out of process); a bad one raises TypeError or ValueError before anything is sent."""
        start = _now_ns()
        try:
            if timeout_s is not None:
                check_timeout(timeout_s)
            outputs = self._infer(inputs, timeout_s)
        except BaseException:
            self._call_stats.record(start, True)
            raise
        self._call_stats.record(start, False)
        return outputs

    def submit(self, inputs, *, timeout_s=None):
        """Start a call and return a ``concurrent.futures.Future`` of its outputs. Inputs are
        checked here (SpecError raises at once); the call's own errors come from the future,
        a worker that failed as the call was sent among them. Calls to one model complete in
        the order they were submitted; out of process, calls to different models run in
        parallel."""
        start = _now_ns()
        try:
            if timeout_s is not None:
                check_timeout(timeout_s)
            arrays, bindings = self._validate_inputs(inputs)
            future = self._submit(arrays, bindings, timeout_s)
        except WorkerError as exc:
            self._call_stats.record(start, True)
            return _failed_future(exc)
        except BaseException:
            self._call_stats.record(start, True)
            raise
        when_settled(future, lambda failed: self._call_stats.record(start, failed))
        return future

    async def infer_async(self, inputs, *, timeout_s=None):
        """``await``-able infer: the event loop keeps running while the model does."""
        return await asyncio.wrap_future(self.submit(inputs, timeout_s=timeout_s))

    def _infer(self, inputs, timeout_s):
        """The outputs of a call on the caller's ``inputs``, both checked against the spec. A
        mode may take its own way to the same result (ope/host/out_of_process.py: a lone
        call's checks in C)."""
        arrays, bindings = self._validate_inputs(inputs)
        return self._validate_outputs(self._run(arrays, bindings, timeout_s), bindings)

    def _validate_inputs(self, inputs):
        if self._closed:
            raise self._closed_error()
        return check_inputs(self._input_plan, inputs)

    def _validate_outputs(self, outputs, bindings):
        return check_outputs(self._output_plan, outputs, bindings)

    def _submit(self, arrays, bindings, timeout_s):
        """A future of the validated outputs. By default the call runs now, in this thread."""
        future = concurrent.futures.Future()
        try:
            future.set_result(self._validate_outputs(self._run(arrays, bindings, timeout_s), bindings))
        except OpeError as exc:
            future.set_exception(exc)
        return future

    @abc.abstractmethod
    def _run(self, arrays, bindings, timeout_s):
        """Execute the model on validated arrays; return its raw outputs by name."""

    @abc.abstractmethod
    def empty(self, name, shape):
        """A writable array for input ``name`` of ``shape`` that ``infer`` can take without
        a copy (out of process it lives in shared memory)."""

    @abc.abstractmethod
    def seal(self, array):
        """Mark an array from :meth:`empty` final (read-only); returns it."""

    @abc.abstractmethod
    def _close(self):
        """Release what the mode holds; called once."""

    def stats(self):
        """Counters, bytes copied into and out of shared memory (0 in process), and latency
        percentiles (µs, over the last calls) of this model."""
        calls, errors, copied_in, copied_out, latencies = self._call_stats.snapshot()
        latencies.sort()
        stats = {"calls": calls, "errors": errors, "bytes_copied_in": copied_in,
                 "bytes_copied_out": copied_out}
        for percent in (50, 90, 99):
            stats[f"latency_p{percent}_us"] = _percentile_us(latencies, percent)
        return stats

    def health(self):
        """Whether the model takes calls; modes add what they know (e.g. the worker)."""
        return {"name": self.name, "open": not self._closed}

    def _closed_error(self):
        return ModelClosed(self._closed_because or f"model {self.name!r} is closed")

    def _disown(self):
        """In a forked child: this copy of the handle does not reach the model, which stays
        the parent's. Calls raise ModelClosed saying so; close() has nothing to release."""
        self._closed = True
        self._closed_because = (
            f"model {self.name!r} belongs to process {self._owner_pid}, which loaded it; this "
            f"process ({os.getpid()}) is a fork of it: load the model again here")

    def close(self):
        """Release the model; further calls raise ModelClosed. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        # A destructor must not raise: it may run at interpreter exit, in a GC cycle, or
        # after __init__ failed half-way.
        if getattr(self, "_closed", True):
            return
        try:
            self.close()
        except Exception:
            _log.exception("closing model %r from its destructor failed", self.name)

    def _empty_spec(self, name, shape):
        """The spec of input ``name`` after checking that ``empty(name, shape)`` may be made."""
        if self._closed:
            raise self._closed_error()
        spec = self._input_spec(name)
        if spec.dtype == "string":
            raise SpecError(f"input {name!r}: string tensors cannot be preallocated; pass a "
                            f"list of str or a numpy str array")
        check_shape(spec, shape)
        return spec

    def _input_spec(self, name):
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise SpecError(f"unknown input {name!r} (expected "
                        f"{', '.join(repr(spec.name) for spec in self.inputs)})")


def check_timeout(timeout_s, name="timeout_s"):
    """Raise unless ``timeout_s`` is None or a non-negative real number of seconds: TypeError
    for another type (a bool too), ValueError for a negative number or NaN."""
    kind = type(timeout_s)
    if kind is not float and kind is not int:  # the common types pass without the ABC check
        if timeout_s is None:
            return
        if kind is bool or not isinstance(timeout_s, numbers.Real):
            raise TypeError(f"{name} must be None or a number of seconds, got {timeout_s!r}")
    if not timeout_s >= 0:  # NaN fails this too
        raise ValueError(f"{name} must be a non-negative number of seconds, got {timeout_s!r}")


def when_settled(future, hook):
    """Run ``hook(failed)`` once ``future`` settles. An out-of-process future runs it as its
    call settles, without making a thread wait for the reply on the caller's behalf
    (ope/host/calls.py, _CallFuture); other futures through a done-callback."""
    settle = getattr(future, "when_settled", None)
    if settle is not None:
        settle(hook)
    else:
        future.add_done_callback(lambda done: hook(done.exception() is not None))


def _percentile_us(sorted_ns, percent):
    """Nearest-rank percentile in µs, None before the first call."""
    if not sorted_ns:
        return None
    rank = max(0, -(-len(sorted_ns) * percent // 100) - 1)
    return sorted_ns[rank] / 1000.0


def _failed_future(error):
    future = concurrent.futures.Future()
    future.set_exception(error)
    return future
