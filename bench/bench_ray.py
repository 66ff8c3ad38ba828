"""Placement on Ray: what a call costs when the model sits on a Ray node, against local ope
and a plain Ray actor doing the same work, and the simulation job's tick rate on two nodes.

    python3 bench/bench_ray.py [--quick]

A two-node Ray cluster is started on this machine (loopback only, as in tests/ray/). Per input
size (16 B, 1 MiB, 16 MiB of float32), an add-one model is called through: local ope (a worker
on this host, out of process), ope placed on the node this driver is attached to, ope placed on
the other node, and a plain Ray actor (``x + 1`` in an actor method) on each node. The columns
run in alternating chunks (bench/README.md, "Method"), medians per call and ratios to local ope
are printed. Then examples/sim_job.py's tick loop runs with both models local, and with the
policy on one node and the perception on the other, alternating runs; ticks/s are printed.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes on 127.0.0.1 alone

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import ope  # noqa: E402
from add_one import build_package  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import sim_job  # noqa: E402

SIZES = [16, 1 << 20, 16 << 20]
_NODE = {"num_cpus": 2, "object_store_memory": 400 << 20, "node_ip_address": "127.0.0.1"}
class PlainActor:
    """The same work as the add-one model, in a plain Ray actor."""

    def add_one(self, x):
        return x + 1


def start_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={
        **_NODE, "resources": {"node_a": 4}, "include_dashboard": False})
    cluster.add_node(**_NODE, resources={"node_b": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def node_ids():
    """(this driver's node, the other node)."""
    here = ray.get_runtime_context().get_node_id()
    other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
    return here, other


def columns(path, here, other):
    """Column name -> (call(x), close())."""
    local = ope.load(path, threads=1)
    same = ope.load(path, placement=ope.RayPlacement(node=here), threads=1)
    far = ope.load(path, placement=ope.RayPlacement(node=other), threads=1)
    plain = {name: ray.remote(PlainActor).options(
        num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        for name, node in (("same", here), ("other", other))}
    return {
        "local ope": (lambda x: local.infer({"x": x})["y"], local.close),
        "ope on Ray, same node": (lambda x: same.infer({"x": x})["y"], same.close),
        "ope on Ray, other node": (lambda x: far.infer({"x": x})["y"], far.close),
        "plain Ray actor, same node": (lambda x: ray.get(plain["same"].add_one.remote(x)),
                                       lambda: ray.kill(plain["same"])),
        "plain Ray actor, other node": (lambda x: ray.get(plain["other"].add_one.remote(x)),
                                        lambda: ray.kill(plain["other"])),
    }


def per_call(columns_, nbytes, rounds, quick):
    """Column -> median µs per call at ``nbytes``, over chunks of calls that alternate the
    columns, the order reversed every other round; each chunk starts with an untimed call."""
    x = np.ones(max(1, nbytes // 4), np.float32)
    calls = {16: 200, 1 << 20: 40, 16 << 20: 6}[nbytes] // (4 if quick else 1) or 2
    times = {name: [] for name in columns_}
    for name, (call, _) in columns_.items():  # warm-up
        for _ in range(3):
            np.testing.assert_array_equal(call(x)[:1], [2.0])
    for round_ in range(rounds):
        order = list(columns_.items())
        for name, (call, _) in (order if round_ % 2 == 0 else order[::-1]):
            call(x)
            for _ in range(calls):
                start = time.perf_counter_ns()
                call(x)
                times[name].append(time.perf_counter_ns() - start)
    return {name: float(np.median(values)) / 1e3 for name, values in times.items()}


class Quiet:
    def update(self, done, tick_ns):
        pass

    def note(self, text):
        pass

    def finish(self):
        pass


def ticks_per_s(policy_path, perception_path, placements, ticks, agents):
    specs = {name: (path, {"threads": 1, **placements.get(name, {})})
             for name, path in (("policy", policy_path), ("perception", perception_path))}
    with ope.ModelSet(specs) as models:
        job = sim_job.Job(models, sim_job.World(agents), Quiet())
        job.run(ticks // 10)  # warm-up
        job.tick_ns.clear()
        job.run(ticks)
        return len(job.tick_ns) / (sum(job.tick_ns) / 1e9)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else 5
    cluster = start_cluster()
    try:
        here, other = node_ids()
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as root:
            cols = columns(build_package(root), here, other)
            try:
                print(f"per-call median, µs (ratio to local ope); load avg "
                      f"{os.getloadavg()[0]:.2f}")
                for nbytes in SIZES:
                    medians = per_call(cols, nbytes, rounds, args.quick)
                    base = medians["local ope"]
                    print(f"  {nbytes:>9,} B: " + "; ".join(
                        f"{name} {value:,.0f} ({value / base:.1f}x)"
                        for name, value in medians.items()))
            finally:
                for _, close in cols.values():
                    close()
            policy_path, perception_path = sim_job.build_packages(root)
            on_two = {"policy": {"placement": ope.RayPlacement(node=here)},
                      "perception": {"placement": ope.RayPlacement(node=other)}}
            ticks = 100 if args.quick else 400
            rates = {"local": [], "two Ray nodes": []}
            runs = [("local", {}), ("two Ray nodes", on_two)]
            for order in (runs, runs[::-1]):  # AB BA
                for name, placements in order:
                    rates[name].append(
                        ticks_per_s(policy_path, perception_path, placements, ticks, 256))
            local, placed = np.median(rates["local"]), np.median(rates["two Ray nodes"])
            print(f"sim job, 256 agents, {ticks} ticks: local {local:,.0f} ticks/s, on two Ray "
                  f"nodes {placed:,.0f} ticks/s ({local / placed:.1f}x slower placed); runs "
                  f"{[round(r) for r in rates['local']]} / "
                  f"{[round(r) for r in rates['two Ray nodes']]}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
