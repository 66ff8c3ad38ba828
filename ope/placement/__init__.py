"""Where a loaded model runs: on this host (the default) or on a Ray cluster.

Design idea: placement is one more decision of ``ope.load``, taken like the mode: from its
``placement`` argument, else from ``OPE_PLACEMENT`` (so a whole job moves to a cluster
without code changes), else local. A placed model is the same :class:`~ope.host.model.Model`
(ope/placement/ray_model.py): on its node, an actor (ope/placement/ray_actor.py) loads the
package with ope's local ``load``, so the model runs in an ope worker there with the same
options, checks and errors. Ray is imported only when a model is placed on it.
"""

import dataclasses
import os
import typing

from ope.errors import OpeError

__all__ = ["RayPlacement", "resolve_placement", "PLACEMENT_ENV"]

PLACEMENT_ENV = "OPE_PLACEMENT"
_SHARES = ("auto", "path", "files")


@dataclasses.dataclass(frozen=True)
class RayPlacement:
    """Place a model on a Ray cluster.

    ``address``: the cluster to join when this process has not joined one (None: "auto");
    ``resources``: custom resources the node must offer (e.g. ``{"sim_node": 1}``);
    ``num_cpus``/``num_gpus``: logical resources each replica's actor holds (``device="cuda"``
    holds one GPU at least); ``node``: a node id (hex) to pin the actor to; ``runtime_env``:
    Ray's runtime environment for the actor; ``share``: how the package reaches the node,
    "path" (every node sees the package's path), "files" (its files go through the object
    store) or "auto" (the path where the node sees the same package, else the files)."""

    address: typing.Optional[str] = None
    resources: typing.Optional[dict] = None
    num_cpus: float = 1
    num_gpus: float = 0
    node: typing.Optional[str] = None
    runtime_env: typing.Optional[dict] = None
    share: str = "auto"

    def __post_init__(self):
        if self.share not in _SHARES:
            raise ValueError(f"share must be one of {', '.join(map(repr, _SHARES))}, "
                             f"got {self.share!r}")


def resolve_placement(placement):
    """The placement ``ope.load`` was asked for: None (this host) or a RayPlacement.
    ``placement`` None follows ``OPE_PLACEMENT`` ("local" or "ray"; unset: local)."""
    if placement is None:
        setting = os.environ.get(PLACEMENT_ENV, "")
        if setting not in ("", "local", "ray"):
            raise OpeError(f"{PLACEMENT_ENV} must be 'local' or 'ray', got {setting!r}")
        placement = setting or "local"
    if isinstance(placement, RayPlacement):
        return placement
    if placement == "local":
        return None
    if placement == "ray":
        return RayPlacement()
    raise ValueError(f"placement must be None, 'local', 'ray' or an ope.RayPlacement, got "
                     f"{placement!r}")
