"""A small simulation job: a vectorised vehicle world asking two models every tick.

    python3 examples/sim_job.py --ticks 500 --agents 256 --kill-at 200

Each tick the world (numpy, on a torus) asks a *perception* model (numpy) what every agent
senses, and a *policy* model (a TorchScript MLP, weights from a fixed seed) how every agent
accelerates. The two run in parallel, each in its own worker process: both calls are submitted,
then both are waited for. The policy acts on the previous tick's perception (a sensor one tick
old, as on a real vehicle), so the two calls of one tick do not depend on each other.

Buffers: the inputs are arrays from ``model.empty`` (in the worker's shared-memory arena),
filled in place every tick and passed to the calls, so a tick copies no input and allocates
nothing. The sealing rule: while a call using an arena array is in flight, that array is
read-only (a write raises ValueError); it is writable again once the call has returned. So
a tick fills its buffers only after the previous tick's calls have completed, as here; a job
that wants to fill tick t+1 while tick t runs uses two sets of buffers and alternates.

Faults: ``--kill-at TICK`` SIGKILLs one worker just before that tick's calls. The call on
the dead worker raises WorkerCrashed; the job reports it and retries that call once, which
starts a fresh worker (the restart policy counts it); the job then completes. The summary
lists per-tick time, the faults seen and recovered, the restarts and every worker pid used.

Placement: ``--placement ray`` serves both models from a Ray cluster (``--address``, else a
Ray instance started on this machine for the job), each in an ope worker on a node; with
``--ray-resources A,B`` the policy goes to the node offering custom resource A, perception to
B. Everything else is the same code; ``--kill-at`` kills a worker by its pid, so it needs the
node on this machine.

Packages are built into a temporary folder at start (and self-checked when built).
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import time

import numpy as np
import psutil
import torch

import ope
from ope import ModelSet, TensorSpec, wait_all

HERE = os.path.dirname(os.path.abspath(__file__))
FEATURES = 8            # perception features per agent (examples/sim_models/perception.py)
WORLD_SIZE = 100.0      # side of the square torus world
DT = 0.1                # seconds of world time per tick
MAX_ACCEL = 2.0
MAX_SPEED = 5.0
DRAG = 0.5              # per second: speeds settle below MAX_SPEED


# -- the models ---------------------------------------------------------------------------

class Policy(torch.nn.Module):
    """obs (agents, 8) -> accel (agents, 2) in [-1, 1]: a small MLP from a fixed seed."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, 2), torch.nn.Tanh())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def build_packages(root):
    """Package the policy (TorchScript) and perception (numpy code + world config)."""
    obs = np.random.default_rng(0).normal(size=(4, FEATURES)).astype(np.float32)
    policy = Policy().eval()
    with torch.no_grad():
        expected = policy(torch.from_numpy(obs)).numpy()
    policy_path = ope.package_torchscript(
        os.path.join(root, "policy"), torch.jit.script(policy), name="policy",
        inputs=[TensorSpec("obs", "float32", ("agents", FEATURES))],
        outputs=[TensorSpec("accel", "float32", ("agents", 2))],
        test_inputs={"obs": obs}, test_outputs={"accel": expected}).path

    data_dir = os.path.join(root, "perception-data")
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, "world.json"), "w") as file:
        json.dump({"size": WORLD_SIZE}, file)
    perception_path = ope.package_python(
        os.path.join(root, "perception"), name="perception",
        code_dir=os.path.join(HERE, "sim_models"), entrypoint="perception:factory",
        data_dir=data_dir,
        inputs=[TensorSpec("pos", "float32", ("agents", 2)),
                TensorSpec("vel", "float32", ("agents", 2))],
        outputs=[TensorSpec("obs", "float32", ("agents", FEATURES))]).path
    return policy_path, perception_path


# -- the world ----------------------------------------------------------------------------

class World:
    """Agents on a torus: positions and velocities, stepped with bounded accelerations."""

    def __init__(self, agents, seed=0):
        rng = np.random.default_rng(seed)
        self.pos = rng.uniform(0, WORLD_SIZE, (agents, 2)).astype(np.float32)
        self.vel = rng.normal(0, 1, (agents, 2)).astype(np.float32)

    def step(self, accel):
        self.vel *= np.float32(1.0 - DRAG * DT)
        self.vel += np.float32(DT * MAX_ACCEL) * accel
        speed = np.linalg.norm(self.vel, axis=1, keepdims=True)
        self.vel *= np.minimum(1.0, MAX_SPEED / np.maximum(speed, 1e-6)).astype(np.float32)
        self.pos += np.float32(DT) * self.vel
        np.mod(self.pos, WORLD_SIZE, out=self.pos)


# -- the job ------------------------------------------------------------------------------

class Job:
    """The tick loop: fill buffers, call both models in parallel, survive a worker fault."""

    def __init__(self, models, world, progress):
        self.models, self.world, self.progress = models, world, progress
        agents = len(world.pos)
        # Arena buffers, filled in place every tick (see the sealing rule above).
        self.inputs = {
            "perception": {"pos": models["perception"].empty("pos", (agents, 2)),
                           "vel": models["perception"].empty("vel", (agents, 2))},
            "policy": {"obs": models["policy"].empty("obs", (agents, FEATURES))},
        }
        self.inputs["policy"]["obs"][...] = 0.0  # no perception before the first tick
        self.faults, self.recovered = [], 0
        self.pids = {name: {model.stats()["pid"]} for name, model in models.items()}
        self.tick_ns = []

    def run(self, ticks, kill_at=None, kill_model="policy"):
        for tick in range(ticks):
            if tick == kill_at:
                self.kill_worker(kill_model, tick)
            start = time.perf_counter_ns()
            self.tick(tick)
            self.tick_ns.append(time.perf_counter_ns() - start)
            self.progress.update(tick + 1, self.tick_ns[-1])
        self.progress.finish()

    def tick(self, tick):
        self.inputs["perception"]["pos"][...] = self.world.pos
        self.inputs["perception"]["vel"][...] = self.world.vel
        results = wait_all(self.models.submit_all(self.inputs), return_exceptions=True)
        for name, result in results.items():
            if isinstance(result, ope.WorkerError):
                results[name] = self.retry(name, tick, result)
            elif isinstance(result, Exception):
                raise result
        # The calls have returned, so the buffers are writable again.
        self.inputs["policy"]["obs"][...] = results["perception"]["obs"]
        self.world.step(results["policy"]["accel"])

    def retry(self, name, tick, error):
        """Report a worker fault and run that call once more (on a fresh worker)."""
        summary = str(error).splitlines()[0]
        self.faults.append(f"tick {tick}: {name}: {type(error).__name__}: {summary}")
        self.progress.note(f"fault at tick {tick}: {name}: {type(error).__name__}; retrying")
        outputs = self.models[name].infer(self.inputs[name])
        self.recovered += 1
        self.pids[name].add(self.models[name].stats()["pid"])
        self.progress.note(f"recovered: {name} now served by pid "
                           f"{self.models[name].stats()['pid']}")
        return outputs

    def kill_worker(self, name, tick):
        """SIGKILL the model's worker, as an OOM killer or a crash would, and wait until it
        is dead, so that this tick's call meets a dead worker for sure."""
        pid = self.models[name].stats()["pid"]
        self.progress.note(f"tick {tick}: killing the {name} worker (pid {pid}) with SIGKILL")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.001)  # the kernel delivers SIGKILL asynchronously

    def summary(self):
        per_tick_ms = np.array(self.tick_ns) / 1e6
        restarts = {name: model.stats()["restarts"] for name, model in self.models.items()}
        speed = float(np.linalg.norm(self.world.vel, axis=1).mean())
        lines = [
            f"ticks: {len(self.tick_ns)} ({len(self.world.pos)} agents), "
            f"total {per_tick_ms.sum() / 1e3:.2f} s",
            f"per-tick time: median {np.median(per_tick_ms):.2f} ms, "
            f"p99 {np.percentile(per_tick_ms, 99):.2f} ms, max {per_tick_ms.max():.2f} ms",
            f"faults: {len(self.faults)} seen, {self.recovered} recovered",
            *(f"  {fault}" for fault in self.faults),
            "restarts: " + ", ".join(f"{name} {count}" for name, count in restarts.items()),
            "worker pids: " + " ".join(str(pid) for pids in self.pids.values()
                                       for pid in sorted(pids)),
            f"world: mean speed {speed:.3f}, finite: {bool(np.isfinite(self.world.pos).all())}",
        ]
        return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr (carriage return, no dependency)."""

    def __init__(self, total, width=30, every_s=0.1):
        self.total, self.width, self.every_s = total, width, every_s
        self.last = 0.0
        self.shown = 0  # length of the bar on screen, so a note can overwrite it
        self.stream = sys.stderr

    def update(self, done, tick_ns):
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        filled = self.width * done // self.total
        bar = (f"[{'#' * filled}{'.' * (self.width - filled)}] "
               f"{done}/{self.total} ticks, {tick_ns / 1e6:6.2f} ms/tick")
        self.shown = len(bar)
        self.stream.write("\r" + bar)
        self.stream.flush()

    def note(self, text):
        """A line of its own over the bar; the bar comes back at the next update."""
        self.stream.write("\r" + text.ljust(self.shown) + "\n")
        self.last = 0.0
        self.stream.flush()

    def finish(self):
        self.stream.write("\n")
        self.stream.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=500)
    parser.add_argument("--agents", type=int, default=256)
    parser.add_argument("--kill-at", type=int, default=None, metavar="TICK",
                        help="SIGKILL one worker just before this tick")
    parser.add_argument("--kill-model", choices=("policy", "perception"), default="policy")
    parser.add_argument("--placement", choices=("local", "ray"), default="local")
    parser.add_argument("--address", default=None, help="Ray cluster to join (with ray)")
    parser.add_argument("--ray-resources", default=None, metavar="A,B",
                        help="custom resources of the policy's and perception's nodes")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="sim-job-") as root:
        policy_path, perception_path = build_packages(root)
        # One intra-op thread each: the two workers share the machine's cores.
        options = {"threads": 1}
        with ModelSet({"policy": (policy_path, {**options, **placement_of(args, 0)}),
                       "perception": (perception_path,
                                      {**options, **placement_of(args, 1)})}) as models:
            job = Job(models, World(args.agents), Progress(args.ticks))
            job.run(args.ticks, args.kill_at, args.kill_model)
            print(job.summary())
    return 0 if job.recovered == len(job.faults) else 1


def placement_of(args, which):
    """``ope.load``'s placement option for model ``which`` (0 policy, 1 perception)."""
    if args.placement == "local":
        return {}
    import ray
    if not ray.is_initialized():
        ray.init(address=args.address)  # None: a Ray instance on this machine, for this job
    resources = args.ray_resources.split(",")[which] if args.ray_resources else None
    return {"placement": ope.RayPlacement(resources={resources: 1} if resources else None)}


if __name__ == "__main__":
    sys.exit(main())
