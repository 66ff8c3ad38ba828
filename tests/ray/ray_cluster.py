"""What the Ray placement tests share: the node arguments, the check that Ray is there,
and what a placed model must not leave behind (ope's actors, ope worker processes).

Both nodes advertise 127.0.0.1 alone: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take
the loopback address as this machine's (else ``ray.init`` turns 127.0.0.1 into the address
of the first network interface), set here before Ray is imported.
"""

import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import pytest  # noqa: E402

try:
    import ray
except ImportError as exc:
    ray = None
    _MISSING = f"ray is not installed ({exc}); pip install 'ope[ray]' runs these tests"

_MIB = 1 << 20
NODE_ARGS = {"num_cpus": 2, "object_store_memory": 200 * _MIB, "node_ip_address": "127.0.0.1"}


def require_ray():
    """Skip the calling test module (fail in CI) with the reason when Ray is missing."""
    if ray is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(_MISSING, pytrace=False)
        pytest.skip(_MISSING, allow_module_level=True)


def ope_actors():
    """Ids of ope's actors (ope/placement/ray_actor.py) alive in the cluster."""
    return {actor_id for actor_id, actor in ray._private.state.actors().items()
            if actor["ActorClassName"].endswith("ModelActor") and actor["State"] == "ALIVE"}


def ope_workers():
    """ope worker processes among this process's descendants (so on the cluster's nodes)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "workers.worker" in " ".join(proc.cmdline()):
                found.add(proc)
        except psutil.Error:
            pass
    return found


def settled(probe, timeout_s=10.0):
    """``probe()`` once it is empty, or its last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if not value or time.monotonic() >= deadline:
            return value
        time.sleep(0.1)
