"""Replicas: N workers of one package behind one Model handle.

Design idea: a :class:`ReplicaSet` is an execution mode made of other modes. The base class
(:class:`ope.host.model.Model`) validates and counts every call once, at the set; ``_run``
and ``_submit`` only choose a replica and hand it the already-validated arrays, so the set
accepts and refuses exactly what a single worker does, and each replica keeps its own worker,
arena, restart policy and supervision (out_of_process.py). Nothing here talks to a worker.

Dispatch: each call goes to the available replica with the fewest calls in flight, ties broken
round robin. "In flight" is counted here, from the moment a call is dispatched until its
result is collected, so two threads dispatching at once see each other's choice (a replica's
own ``outstanding`` only counts a call once it has been sent). A replica whose worker is being
(re)started is avoided while another can serve, so a crash costs the set one call, not a stall:
replicas restart eagerly by default, in the background, under their own policy.

Arena buffers: an array from :meth:`ReplicaSet.empty` lives in one replica's arena. A call
that passes one goes to that replica (zero copy); only if that replica cannot serve (broken,
restarting) does the call go elsewhere, and then the array is copied like any other input.
``empty`` hands out buffers round robin, so a tick loop that makes one set of buffers per
replica uses them all without copies.
"""

import concurrent.futures
import functools
import logging
import threading

from ope.host.out_of_process import OutOfProcessModel
from ope.host.model import Model, when_settled

__all__ = ["ReplicaSet", "start_in_parallel", "close_all"]

_log = logging.getLogger("ope")

# States (OutOfProcessModel.state) in which a replica cannot take a call without the caller
# waiting for a worker start; "restarting" only counts when the supervisor restarts it.
_STARTING = frozenset({"starting", "broken", "closed"})
_STARTING_EAGER = _STARTING | {"restarting"}
# health()'s summary state of the set: the most useful state any replica is in.
_STATE_ORDER = ("busy", "ready", "starting", "restarting", "broken", "closed")


def start_in_parallel(factories):
    """Call every factory (key -> zero-argument callable returning a Model) in its own thread.

    Returns key -> model. If any factory raises, the models that did start are closed and the
    first error (in the order of ``factories``) is raised, with a note naming its key; every
    start has ended by then, so nothing keeps running behind the caller's back."""
    if not factories:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(len(factories), thread_name_prefix="ope-start")
    futures = {key: pool.submit(factory) for key, factory in factories.items()}
    try:
        concurrent.futures.wait(futures.values())
    except BaseException:  # interrupted: let every start end, then undo the ones that worked
        pool.shutdown(wait=True)
        close_all(f.result() for f in futures.values() if f.exception() is None)
        raise
    pool.shutdown(wait=False)
    started = {key: f.result() for key, f in futures.items() if f.exception() is None}
    failed = [(key, f.exception()) for key, f in futures.items() if f.exception() is not None]
    if failed:
        close_all(started.values())
        key, error = failed[0]
        error.add_note(f"(while starting {key!r}; {len(started)} others started were closed)")
        raise error
    return started


def close_all(models):
    """Close each model, all of them even if one fails; then raise the first failure."""
    first = None
    for model in models:
        try:
            model.close()
        except Exception as exc:  # the next model must still be closed
            _log.exception("closing model %r failed", getattr(model, "name", model))
            first = first or exc
    if first is not None:
        raise first


class ReplicaSet(Model):
    """``replicas`` out-of-process workers of ``package``, served through one handle.

    ``worker_options`` are those of :class:`~ope.host.out_of_process.OutOfProcessModel` and
    apply to every replica; ``restart`` defaults to "eager" so a crashed replica is replaced in
    the background while the others serve. Workers start in parallel threads: start-up takes
    about as long as one worker's. ``member``: the Model class of a replica, called as
    ``member(package, restart=..., **worker_options)``; another than OutOfProcessModel
    (ope/placement/ray_model.py) offers the same ``state``, ``holds``, ``stats`` and
    ``health``."""

    _bound_to_process = True

    def __init__(self, package, replicas, *, restart="eager", member=OutOfProcessModel,
                 **worker_options):
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be a positive int, got {replicas!r}")
        super().__init__(package)
        self._closed = True  # until every replica runs: nothing for close() or __del__ to do
        self.restart = restart
        self._avoid = _STARTING_EAGER if restart == "eager" else _STARTING
        self._lock = threading.Lock()  # guards the counters below, never held during a call
        self._in_flight = [0] * replicas
        self._dispatched = [0] * replicas
        self._failed = [0] * replicas
        self._next = 0  # round-robin position: where the next tie-break starts
        start = functools.partial(member, package, restart=restart, **worker_options)
        started = start_in_parallel({index: start for index in range(replicas)})
        self._replicas = [started[index] for index in range(replicas)]
        self._closed = False

    @property
    def replicas(self):
        """The replicas' models, in dispatch order (for inspection; call through the set)."""
        return tuple(self._replicas)

    # -- dispatch --------------------------------------------------------------------------

    def _run(self, arrays, bindings, timeout_s):
        index = self._dispatch(arrays)
        failed = True
        try:
            outputs = self._replicas[index]._run(arrays, bindings, timeout_s)
            failed = False
            return outputs
        finally:
            self._settle(index, failed)

    def _submit(self, arrays, bindings, timeout_s):
        index = self._dispatch(arrays)
        try:
            future = self._replicas[index]._submit(arrays, bindings, timeout_s)
        except BaseException:
            self._settle(index, failed=True)
            raise
        when_settled(future, lambda failed: self._settle(index, failed))
        return future

    def _dispatch(self, arrays):
        """Index of the replica for a call with ``arrays``, counted in flight from now."""
        owner = self._owner(arrays.values())
        with self._lock:
            if owner is not None and self._can_serve(owner):
                index = owner
            else:
                index = self._least_loaded()
            self._in_flight[index] += 1
            self._dispatched[index] += 1
        return index

    def _settle(self, index, failed):
        with self._lock:
            self._in_flight[index] -= 1
            self._failed[index] += failed

    def _least_loaded(self):
        """Fewest in flight among replicas that can serve now (all, if none can); the scan
        starts at the round-robin position so equal loads take turns. Caller holds _lock."""
        count = len(self._replicas)
        order = [(self._next + k) % count for k in range(count)]
        candidates = [i for i in order if self._can_serve(i)] or order
        index = min(candidates, key=self._in_flight.__getitem__)  # min keeps the first tie
        self._next = (index + 1) % count
        return index

    def _can_serve(self, index):
        # An unlocked read of the replica's state: a hint for dispatch, re-checked by the
        # replica itself under its own lock when the call is sent.
        return self._replicas[index].state not in self._avoid

    def _owner(self, arrays):
        """Index of the replica whose arena holds one of ``arrays``, else None."""
        for array in arrays:
            for index, replica in enumerate(self._replicas):
                if replica.holds(array):
                    return index
        return None

    # -- arena buffers ---------------------------------------------------------------------

    def empty(self, name, shape):
        """A writable array in one replica's arena (round robin over replicas that can serve);
        calls passing it go to that replica without a copy."""
        self._empty_spec(name, shape)
        with self._lock:
            count = len(self._replicas)
            order = [(self._next + k) % count for k in range(count)]
            index = next((i for i in order if self._can_serve(i)), order[0])
            self._next = (index + 1) % count
        return self._replicas[index].empty(name, shape)

    def seal(self, array):
        """Make ``array`` read-only for good (see OutOfProcessModel.seal). Returns it."""
        owner = self._owner([array])
        return self._replicas[0 if owner is None else owner].seal(array)

    # -- visibility and teardown -----------------------------------------------------------

    def stats(self):
        """The set's calls, errors and latencies, byte and arena counters summed over
        replicas, and per replica: pid, state, calls in flight, calls dispatched, restarts,
        standbys (each replica keeps its own, ``standby`` of them)."""
        stats = super().stats()
        each = [replica.stats() for replica in self._replicas]
        for key in ("bytes_copied_in", "bytes_copied_out", "arena_bytes_in_use",
                    "arena_high_water", "arena_bytes_reserved", "restarts"):
            stats[key] = sum(s[key] for s in each)
        with self._lock:
            counters = list(zip(self._in_flight, self._dispatched, self._failed))
        stats["pids"] = [s["pid"] for s in each]
        stats["replicas"] = [
            {"pid": s["pid"], "state": s["state"], "outstanding": flight, "calls": calls,
             "errors": errors, "restarts": s["restarts"], "standby": s.get("standby"),
             **{key: s[key] for key in ("node", "node_ip") if key in s}}
            for s, (flight, calls, errors) in zip(each, counters)]
        return stats

    def health(self):
        """The set is as healthy as its best replica; each replica's health is listed."""
        health = super().health()
        replicas = [replica.health() for replica in self._replicas]
        states = {h["state"] for h in replicas}
        health.update(mode="replicas", replicas=replicas,
                      restarts=sum(h["restarts"] for h in replicas),
                      state="closed" if self._closed or not replicas else
                      next((s for s in _STATE_ORDER if s in states), "unknown"))
        return health

    def _close(self):
        close_all(self._replicas)
