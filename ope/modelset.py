"""Many models per tick: load a set of packages with one call, call them together.

Design idea: a :class:`ModelSet` owns nothing but its models. It loads them through the same
path as ``ope.load`` (one thread per package, so their workers start at once and start-up
costs about the slowest package's), maps names to models, and closes them together. Calls
go through each model's own ``submit``, so models in different workers run in parallel and
each keeps its own order, errors and restart policy; all workers share the host's one
supervisor (ope/host/supervisor.py). :func:`wait_all` turns a dict or list of futures into
results of the same shape once every call has settled.
"""

import collections.abc
import functools
import time

from ope import api
from ope.host.replicas import close_all, start_in_parallel

__all__ = ["ModelSet", "wait_all"]


def wait_all(futures, timeout=None, *, return_exceptions=False):
    """Results of ``futures`` (a dict name -> future, or a list) in the same shape.

    Waits for every future to settle, then raises the first error in the order given (so
    no call is still running when the caller handles it), unless ``return_exceptions``, which
    puts each error in its result's place. Past ``timeout`` seconds, raises TimeoutError
    (concurrent.futures.TimeoutError) and leaves the futures running."""
    keyed = futures.items() if isinstance(futures, collections.abc.Mapping) else enumerate(futures)
    deadline = None if timeout is None else time.monotonic() + timeout
    settled = {}
    for key, future in keyed:
        settled[key] = _settle(future, deadline)
    if not return_exceptions:
        first = next((r for r in settled.values() if isinstance(r, _Failure)), None)
        if first is not None:
            raise first.error
    results = {key: r.error if isinstance(r, _Failure) else r for key, r in settled.items()}
    return results if isinstance(futures, collections.abc.Mapping) else list(results.values())


class _Failure:
    """An error in a result's place, told apart from a result that happens to be an error."""

    __slots__ = ("error",)

    def __init__(self, error):
        self.error = error


def _settle(future, deadline):
    # result() without a timeout lets an ope future collect its own reply in this thread
    # (no hand-off to the collector thread); a deadline waits the normal way.
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return future.result(timeout)
    except Exception as exc:
        if not future.done():  # our wait timed out, not the call
            raise
        return _Failure(exc)


class ModelSet(collections.abc.Mapping):
    """Models by name, loaded in parallel, closed together.

    ``specs`` maps a name to a package path, or to ``(path, options)`` where options are
    those of ``ope.load`` (``out_of_process``, ``timeout_s``, worker options, ``replicas``,
    ``placement``: each model may run on another node of a Ray cluster).
    If any package fails to load, the ones already loaded are closed and its error is raised.
    Use as a context manager, or call :meth:`close`."""

    def __init__(self, specs):
        factories = {name: functools.partial(_load, *_path_and_options(name, spec))
                     for name, spec in specs.items()}
        self._models = start_in_parallel(factories)
        self._closed = False

    def __getitem__(self, name):
        return self._models[name]

    def __iter__(self):
        return iter(self._models)

    def __len__(self):
        return len(self._models)

    def __repr__(self):
        state = "closed" if self._closed else "open"
        return f"<ModelSet {', '.join(map(repr, self._models))} ({state})>"

    def submit_all(self, inputs, *, timeout_s=None):
        """Start one call per entry of ``inputs`` (name -> that model's inputs); returns
        name -> future. A SpecError raises at once, before any call of this batch starts."""
        if not set(inputs) <= set(self._models):
            unknown = ", ".join(repr(name) for name in inputs if name not in self._models)
            raise KeyError(f"no model named {unknown} in this set")
        futures = {}
        try:
            for name, model_inputs in inputs.items():
                futures[name] = self._models[name].submit(model_inputs, timeout_s=timeout_s)
        except BaseException:
            wait_all(futures, return_exceptions=True)  # no call of a refused batch keeps running
            raise
        return futures

    def infer_all(self, inputs, *, timeout_s=None):
        """Run the models named in ``inputs`` in parallel; returns name -> outputs, or raises
        the first error once all calls have settled."""
        return wait_all(self.submit_all(inputs, timeout_s=timeout_s))

    def stats(self):
        return {name: model.stats() for name, model in self._models.items()}

    def health(self):
        return {name: model.health() for name, model in self._models.items()}

    def close(self):
        """Close every model (each even if another fails). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        close_all(self._models.values())

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _path_and_options(name, spec):
    if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
        return spec, {}
    try:
        path, options = spec
    except (TypeError, ValueError):
        raise TypeError(f"model {name!r}: expected a path or (path, options), got {spec!r}") \
            from None
    return path, dict(options)


def _load(path, options):
    return api.load(path, **options)
