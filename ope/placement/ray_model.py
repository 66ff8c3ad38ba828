"""The host side of a model placed on Ray: a Model whose calls go to an actor on a node.

Design idea: the base class (ope/host/model.py) validates and counts every call here, before
anything leaves the host, so a placed model accepts and refuses exactly what a local one
does. ``_run``/``_submit`` hand the validated arrays to the actor (ope/placement/ray_actor.py),
which calls the node's ope model; what comes back is checked against the spec again here.
Every failure Ray reports goes through one function (ope/placement/ray_errors.py) to the ope
error of the same meaning.

Faults: a lost actor (killed, crashed, or gone with its node) is replaced lazily, by the next
call, under a restart policy of its own; past its limit the model is broken (ModelBroken).
Faults of the node's worker are the node's ope's: it restarts the worker and its errors arrive
unchanged. A call's deadline is enforced on the node (the worker's kill ladder); ``infer``
waits ``_REPLY_GRACE_S`` longer for the node's answer, then cancels the call itself
(WorkerTimeout).

No zero copy crosses machines: :meth:`empty` and :meth:`seal` give ordinary arrays, and inputs
and outputs travel through Ray's object store.
"""

import dataclasses
import functools
import logging
import threading
import time
import uuid

import numpy as np

from ope.errors import EnvError, ModelBroken, OpeError, PackageError
from ope.host.model import Model, check_timeout
from ope.host.supervisor import RestartPolicy
from ope.placement.ray_actor import ModelActor, package_files
from ope.placement.ray_errors import ope_error

__all__ = ["RayModel", "load_on_ray", "connect"]

_log = logging.getLogger("ope")

_MAX_CONCURRENCY = 64  # threads of an actor: calls in parallel, control calls never starved
_CONTROL_TIMEOUT_S = 10.0  # stats, health and close, sent to an actor that may be stuck
_REPLY_GRACE_S = 30.0  # past a call's deadline: the node's own WorkerTimeout comes first


def connect(address):
    """The ``ray`` module, joined to a cluster: this process's connection if it has one,
    else ``ray.init(address=address or "auto")``. EnvError without Ray or a cluster."""
    try:
        import ray
    except ImportError as exc:
        raise EnvError(f"placement on Ray needs the ray package ({exc}); pip install "
                       f"'ope[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto")
        except ConnectionError as exc:
            raise EnvError(f"no Ray cluster to join at {address or 'auto'} ({exc}); start one "
                           f"(ray start --head) or pass RayPlacement(address=...)") from None
    return ray


def load_on_ray(package, placement, local_load, *, out_of_process=None, replicas=None,
                device=None, **options):
    """What ``ope.load`` returns for a model placed on Ray: a RayModel, or a ReplicaSet of
    ``replicas`` RayModels. ``options`` are ``load``'s, applied by the node's ``load``."""
    if out_of_process is False:
        raise TypeError("a model placed on Ray runs out of process on its node; do not pass "
                        "out_of_process=False with a placement")
    if device is not None:
        options["device"] = device
        if str(device).startswith("cuda") and not placement.num_gpus:
            placement = dataclasses.replace(placement, num_gpus=1)
    member = functools.partial(RayModel, placement=placement, local_load=local_load)
    if replicas is None:
        return member(package, **options)
    from ope.host.replicas import ReplicaSet
    return ReplicaSet(package, replicas, member=member, **options)


@functools.cache
def _actor_class(ray):
    return ray.remote(ModelActor)


class RayModel(Model):
    """A model served by an actor on a Ray node. Create it with ``ope.load(path,
    placement=...)``. ``placement``: an :class:`ope.placement.RayPlacement`;
    ``local_load``: ``ope.load``, which the actor calls on the node; ``options``: those of
    ``ope.load`` for the node's model (``timeout_s``, ``env``, ``device``, worker options);
    ``max_restarts``/``restart_window_s`` bound both the node's worker restarts and the
    host's actor replacements."""

    _bound_to_process = True

    def __init__(self, package, *, placement, local_load, timeout_s=None, load_timeout_s=120.0,
                 restart="lazy", max_restarts=5, restart_window_s=60.0, **options):
        check_timeout(timeout_s)
        check_timeout(load_timeout_s, "load_timeout_s")
        super().__init__(package)
        self._closed = True  # until the first actor serves: nothing for close() to do
        self._ray = connect(placement.address)
        self.placement = placement
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.restart = restart
        self._node_options = dict(options, timeout_s=timeout_s, load_timeout_s=load_timeout_s,
                                  restart=restart, max_restarts=max_restarts,
                                  restart_window_s=restart_window_s)
        self._local_load = local_load
        self._policy = RestartPolicy(max_restarts, restart_window_s)
        self._lock = threading.Lock()  # guards _actor, _where, _state; never held over a call
        self._start_lock = threading.Lock()  # one actor start at a time
        self._files = None  # the package's files in the object store, once a node needed them
        self._actor, self._where = self._start_actor()
        self._state = "ready"
        self._closed = False

    @property
    def state(self):
        """"ready", "starting" (an actor being placed), "lost" (the next call replaces the
        actor), "broken" or "closed"."""
        return "closed" if self._closed else self._state

    def holds(self, array):
        return False  # no arena on this host: arrays travel through the object store

    # -- placing the actor -----------------------------------------------------------------

    def _start_actor(self):
        """A new actor with the model loaded, and where it runs; raises EnvError where no
        node can take it, the model's load error otherwise."""
        ray, placement = self._ray, self.placement
        request = {"CPU": placement.num_cpus, "GPU": placement.num_gpus,
                   **(placement.resources or {})}
        _check_feasible(ray, self.name, request, placement.node)
        # A name makes the actor reachable with ray.get_actor (stats() and health() give it).
        name = f"ope-{self.name}-{uuid.uuid4().hex[:12]}"
        options = {"num_cpus": placement.num_cpus, "num_gpus": placement.num_gpus,
                   "max_concurrency": _MAX_CONCURRENCY, "max_restarts": 0, "name": name}
        if placement.resources:
            options["resources"] = dict(placement.resources)
        if placement.runtime_env:
            options["runtime_env"] = placement.runtime_env
        if placement.node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(placement.node,
                                                                             soft=False)
        actor = _actor_class(ray).options(**options).remote(self._local_load)
        try:
            where = self._placed(actor.where.remote(), None)
            self._open(actor, where["node"])
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        return actor, {**where, "actor": name}

    def _open(self, actor, node):
        share, path = self.placement.share, self.package.path
        digest = self.package.manifest_digest
        if share != "files":
            if self._placed(actor.open.remote(path, digest, None, self._node_options), node):
                return
            if share == "path":
                raise PackageError(f"package {self.name!r}: Ray node {node} does not see it at "
                                   f"{path} (RayPlacement(share='files') sends its files)")
        if self._files is None:
            self._files = self._ray.put(package_files(path))
        self._placed(actor.open.remote(path, digest, self._files, self._node_options), node)

    def _placed(self, ref, node):
        """The result of a start-up step; past ``load_timeout_s`` the cluster had no room."""
        try:
            return self._ray.get(ref, timeout=self.load_timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            self._ray.cancel(ref)
            raise EnvError(f"model {self.name!r}: Ray did not place and load it within "
                           f"{self.load_timeout_s} s (placement {self.placement}); the cluster "
                           f"has no free node with the resources asked for") from None
        except Exception as exc:
            raise ope_error(exc, model=self.name, node=node)[0] from None

    def _actor_for_call(self):
        """The actor to send a call to, placing a new one if the last was lost."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._actor is not None:
                return self._actor, self._where["node"]
        with self._start_lock:
            with self._lock:
                if self._closed:
                    raise self._closed_error()
                if self._actor is not None:
                    return self._actor, self._where["node"]
                if self._policy.broken:
                    self._state = "broken"
                    raise ModelBroken(
                        f"model {self.name!r}: its Ray actor was lost more than "
                        f"{self._policy.max_restarts} times in {self._policy.window_s} s; "
                        f"refusing calls ({self._policy.describe()})")
                self._state = "starting"
            time.sleep(self._policy.delay_s())
            try:
                actor, where = self._start_actor()
            except BaseException:
                with self._lock:
                    self._state = "lost"
                raise
            with self._lock:
                if self._closed:  # closed while placing: the new actor goes too
                    self._ray.kill(actor, no_restart=True)
                    raise self._closed_error()
                self._actor, self._where, self._state = actor, where, "ready"
                return actor, where["node"]

    # -- calls -----------------------------------------------------------------------------

    def _deadline(self, timeout_s):
        return self.timeout_s if timeout_s is None else timeout_s

    def _run(self, arrays, bindings, timeout_s):
        actor, node = self._actor_for_call()
        deadline = self._deadline(timeout_s)
        ref = None
        try:
            # Sending puts large inputs in the object store, which may be full.
            ref = actor.infer.remote(arrays, deadline)
            return self._ray.get(ref, timeout=None if deadline is None
                                 else deadline + _REPLY_GRACE_S)
        except Exception as exc:
            raise self._failed(exc, actor, node, ref) from None

    def _submit(self, arrays, bindings, timeout_s):
        import concurrent.futures
        actor, node = self._actor_for_call()
        try:
            ref = actor.infer.remote(arrays, self._deadline(timeout_s))
        except Exception as exc:
            raise self._failed(exc, actor, node, None) from None
        future = concurrent.futures.Future()

        def settle(done):
            try:
                outputs = done.result()
            except Exception as exc:
                future.set_exception(self._failed(exc, actor, node, ref))
                return
            try:
                future.set_result(self._validate_outputs(outputs, bindings))
            except OpeError as exc:
                future.set_exception(exc)

        ref.future().add_done_callback(settle)
        return future

    def _failed(self, exc, actor, node, ref):
        """The ope error for a call's failure ``exc``; a lost actor is let go for the next
        call to replace, a call the host gave up on is cancelled."""
        error, lost = ope_error(exc, model=self.name, node=node)
        if ref is not None and isinstance(exc, self._ray.exceptions.GetTimeoutError):
            self._ray.cancel(ref)
        if lost:
            self._lose(actor, error)
        return error

    def _lose(self, actor, error):
        with self._lock:
            if self._actor is not actor:
                return  # another call saw it first
            self._actor = None
            self._state = "lost"
            self._policy.record(str(error).splitlines()[0])
        try:
            self._ray.kill(actor, no_restart=True)
        except Exception:  # already gone with its node
            pass

    # -- buffers: ordinary memory, no zero copy across machines ----------------------------

    def empty(self, name, shape):
        return np.empty(tuple(shape), self._empty_spec(name, shape).numpy_dtype)

    def seal(self, array):
        array.flags.writeable = False
        return array

    # -- visibility and teardown -----------------------------------------------------------

    def _ask(self, method):
        """What the actor's ``method`` returns, or None when it has none or does not answer
        within _CONTROL_TIMEOUT_S (a lost actor is let go)."""
        with self._lock:
            actor, where = self._actor, self._where
        if actor is None:
            return None
        try:
            return self._ray.get(getattr(actor, method).remote(), timeout=_CONTROL_TIMEOUT_S)
        except Exception as exc:
            error, lost = ope_error(exc, model=self.name, node=where.get("node"))
            if lost:
                self._lose(actor, error)
            return None

    def _placement_fields(self, node_view):
        with self._lock:
            where, actor_restarts = dict(self._where), len(self._policy.history)
        return {"mode": "ray", "node": where.get("node"), "node_ip": where.get("ip"),
                "actor": where.get("actor"), "actor_pid": where.get("actor_pid"),
                "pid": (node_view or {}).get("pid"),
                "restarts": actor_restarts + (node_view or {}).get("restarts", 0),
                "actor_restarts": actor_restarts}

    def stats(self):
        """The host's counts and latencies (Ray's transfer included), the node model's byte
        and arena counters, the node, and restarts of actor and worker together."""
        stats = super().stats()
        node_stats = self._ask("stats") or {}
        for key in ("bytes_copied_in", "bytes_copied_out", "arena_bytes_in_use",
                    "arena_high_water", "arena_bytes_reserved"):
            stats[key] = node_stats.get(key, 0)
        stats.update(self._placement_fields(node_stats),
                     state=self.state if self._actor is None or self._closed
                     else node_stats.get("state", "unreachable"),
                     worker=node_stats.get("worker", {}))
        return stats

    def health(self):
        health = super().health()
        node_health = self._ask("health")
        health.update(self._placement_fields(node_health),
                      state=self.state if self._actor is None or self._closed
                      else (node_health or {}).get("state", "unreachable"))
        return health

    def _close(self):
        with self._lock:
            actor, self._actor, self._state = self._actor, None, "closed"
        self._files = None
        if actor is None:
            return
        try:
            self._ray.get(actor.close.remote(), timeout=_CONTROL_TIMEOUT_S)
        except Exception:  # the node's model may be gone with its actor; the actor goes anyway
            _log.warning("closing model %r on its Ray actor failed", self.name, exc_info=True)
        finally:
            self._ray.kill(actor, no_restart=True)


def _check_feasible(ray, name, request, node):
    """EnvError unless an alive node (``node``, where given) offers every resource of
    ``request`` in total; Ray itself would wait for such a node for ever."""
    wanted = {key: amount for key, amount in request.items() if amount}
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if node is not None:
        alive = [n for n in alive if n["NodeID"] == node]
        if not alive:
            raise EnvError(f"model {name!r}: no alive Ray node has id {node!r}")
    if any(all(n["Resources"].get(key, 0) >= amount for key, amount in wanted.items())
           for n in alive):
        return
    offered = "; ".join(f"{n['NodeID'][:12]}: {_resources_text(n['Resources'])}" for n in alive)
    raise EnvError(f"model {name!r}: no Ray node offers {_resources_text(wanted)} "
                   f"(nodes: {offered or 'none alive'})")


def _resources_text(resources):
    return ", ".join(f"{key}={amount:g}" for key, amount in sorted(resources.items())
                     if not key.startswith("node:") and key not in ("memory",
                                                                     "object_store_memory"))
