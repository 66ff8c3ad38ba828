"""A two-node Ray cluster on this machine, started once for the Ray placement tests.

Both nodes advertise 127.0.0.1 alone: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take the
loopback address as this machine's (else ``ray.init`` turns 127.0.0.1 into the address of
the first network interface), set before Ray is imported. Each node offers a custom resource
of its own ("node_a", "node_b"), so a test places a model on either. Without Ray installed
the tests skip, saying so; with ``CI=true`` they fail instead.

A cluster's processes (raylets and their pools of Ray workers) are children of this process
and live as long as the session, so the suite's leak check is replaced here by what a placed
model must not leave: an actor of ope's, or an ope worker process on a node.
"""

import pytest

from ray_cluster import NODE_ARGS, ope_actors, ope_workers, ray, require_ray, settled

try:
    from ray.cluster_utils import Cluster
except ImportError:
    Cluster = None


@pytest.fixture(scope="session")
def cluster():
    require_ray()
    started = Cluster(initialize_head=True, head_node_args={
        **NODE_ARGS, "resources": {"node_a": 4}, "include_dashboard": False})
    try:
        started.add_node(**NODE_ARGS, resources={"node_b": 4, "spare": 1})
        started.wait_for_nodes()
        ray.init(address=started.address, log_to_driver=False)
        yield started
    finally:
        ray.shutdown()
        started.shutdown()


@pytest.fixture(scope="session")
def nodes(cluster):
    """Custom resource -> id of the node offering it."""
    found = {}
    for node in ray.nodes():
        if node["Alive"]:
            assert node["NodeManagerAddress"] == "127.0.0.1", node
            for resource in ("node_a", "node_b"):
                if resource in node["Resources"]:
                    found[resource] = node["NodeID"]
    assert sorted(found) == ["node_a", "node_b"]
    return found


@pytest.fixture(autouse=True)
def no_leaks():
    """Overrides the suite's check (tests/conftest.py) for these tests: no ope actor and no
    ope worker process left once a test's models are closed."""
    if ray is None or not ray.is_initialized():
        yield
        return
    actors_before, workers_before = ope_actors(), ope_workers()
    yield
    assert settled(lambda: ope_actors() - actors_before) == set()
    assert settled(lambda: ope_workers() - workers_before) == set()
