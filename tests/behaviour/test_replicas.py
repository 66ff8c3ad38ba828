"""Replicas: one handle, N workers. Dispatch, arena ownership, crashes, parallel start, close.

Which replica served a call is read from the call's output (the worker's pid); that workers
started in parallel is shown by a rendezvous at load time that only succeeds if all of them
are loading at once. No test depends on how long anything takes.
"""

import asyncio
import os
import time

import numpy as np
import pytest

import ope
from ope import TensorSpec
from ope.package import read_package

import models
from fault_package import fault_package

__all__ = ["whoami_package", "whoami_inputs", "BARRIER_ENV"]

_WHOAMI_SOURCE = '''
import os
import signal
import time

import numpy as np


def _rendezvous():
    """With WHOAMI_BARRIER_DIR set, wait (bounded) until WHOAMI_BARRIER_N workers are loading;
    True if they all were. Workers started one after another cannot all meet."""
    folder = os.environ.get("WHOAMI_BARRIER_DIR")
    if not folder:
        return True
    want = int(os.environ["WHOAMI_BARRIER_N"])
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if len(os.listdir(folder)) >= want:
            return True
        time.sleep(0.01)
    return False


def _fail_one():
    """With WHOAMI_FAIL_ONE set, the first worker to load claims the file and fails."""
    claim = os.environ.get("WHOAMI_FAIL_ONE")
    if claim:
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        raise RuntimeError("this replica was chosen to fail")


def factory(data_dir):
    _fail_one()
    met = _rendezvous()

    def run(x, hold):
        if hold < 0:
            os.kill(os.getpid(), signal.SIGKILL)
        started = time.time()
        time.sleep(float(hold))
        return {"y": x + 1, "pid": np.array(os.getpid(), np.int64), "met": np.array(met),
                "span": np.array([started, time.time()])}
    return run
'''

BARRIER_ENV = ("WHOAMI_BARRIER_DIR", "WHOAMI_BARRIER_N")


def whoami_package(root):
    """x float32 (n,), hold float64 () (seconds to sleep; < 0: SIGKILL itself) -> y = x + 1,
    pid int64 (), met bool () (the load-time rendezvous), span float64 (2,) (when it ran)."""
    path = os.path.join(root, "whoami")
    if os.path.exists(path):
        return path
    return models.numpy_package(
        root, _WHOAMI_SOURCE, name="whoami",
        inputs=[TensorSpec("x", "float32", ("n",)), TensorSpec("hold", "float64", ())],
        outputs=[TensorSpec("y", "float32", ("n",)), TensorSpec("pid", "int64", ()),
                 TensorSpec("met", "bool", ()), TensorSpec("span", "float64", (2,))]).path


def whoami_inputs(value=1.0, hold=0.0, x=None):
    return {"x": np.full(3, value, np.float32) if x is None else x, "hold": np.array(hold)}


@pytest.fixture(scope="module")
def whoami(package_root):
    return read_package(whoami_package(str(package_root)))


@pytest.fixture
def open_set(whoami):
    opened = []

    def open_(replicas=2, package=whoami, **options):
        options.setdefault("stop_grace_s", 0.5)
        model = ope.load(package.path, replicas=replicas, **options)
        opened.append(model)
        return model

    yield open_
    for model in opened:
        model.close()


def served_by(model, calls, **inputs):
    return [int(model.infer(whoami_inputs(**inputs))["pid"]) for _ in range(calls)]


def test_a_replica_set_is_a_model_with_the_packages_specs(open_set, whoami):
    model = open_set()
    assert isinstance(model, ope.Model)
    assert model.inputs == whoami.inputs and model.outputs == whoami.outputs
    np.testing.assert_array_equal(model.infer(whoami_inputs(2.0))["y"], [3.0, 3.0, 3.0])


def test_successive_calls_take_turns_over_the_replicas(open_set):
    model = open_set(replicas=3)
    pids = model.stats()["pids"]
    assert len(set(pids)) == 3
    assert served_by(model, 6) == pids + pids


def test_submitted_calls_spread_over_the_replicas(open_set):
    model = open_set()
    futures = [model.submit(whoami_inputs(i)) for i in range(6)]
    results = [f.result() for f in futures]
    assert [r["y"][0] for r in results] == [i + 1 for i in range(6)]
    # the first two calls cannot share a replica: one is in flight or both are idle (turns)
    assert int(results[0]["pid"]) != int(results[1]["pid"])
    assert {int(r["pid"]) for r in results} == set(model.stats()["pids"])
    assert sum(r["calls"] for r in model.stats()["replicas"]) == 6


def test_a_busy_replica_gets_no_new_calls_while_another_is_idle(open_set):
    model = open_set()
    held = model.submit(whoami_inputs(hold=60.0))
    busy = [r["pid"] for r in model.stats()["replicas"] if r["outstanding"] == 1]
    assert len(busy) == 1
    idle = set(model.stats()["pids"]) - set(busy)
    assert set(served_by(model, 4)) == idle
    model.close()
    with pytest.raises(ope.ModelClosed):
        held.result(timeout=30)


def test_replicas_start_in_parallel(open_set, tmp_path):
    model = open_set(replicas=3, env_vars={BARRIER_ENV[0]: str(tmp_path), BARRIER_ENV[1]: "3"})
    results = [model.infer(whoami_inputs()) for _ in range(3)]
    assert len({int(r["pid"]) for r in results}) == 3
    assert all(bool(r["met"]) for r in results), "the workers were not all loading at once"


def test_a_killed_replica_is_replaced_while_the_others_serve(open_set):
    model = open_set()
    before = set(model.stats()["pids"])
    with pytest.raises(ope.WorkerCrashed, match="SIGKILL"):
        model.infer(whoami_inputs(hold=-1.0))
    assert int(model.infer(whoami_inputs())["pid"]) in model.stats()["pids"]
    _wait_until_all_ready(model)
    after = set(model.stats()["pids"])
    assert len(after) == 2 and len(after & before) == 1
    assert set(served_by(model, 4)) == after
    assert model.stats()["restarts"] == 1 and model.health()["restarts"] == 1
    assert model.stats()["errors"] == 1


def test_an_arena_buffer_sends_its_calls_to_the_replica_that_owns_it(open_set):
    model = open_set()
    buffers = [model.empty("x", (3,)) for _ in range(2)]
    for value, buffer in enumerate(buffers):
        buffer[...] = value
    owners = []
    for _ in range(3):
        for value, buffer in enumerate(buffers):
            out = model.infer(whoami_inputs(x=buffer))
            assert out["y"][0] == value + 1 and buffer.flags.writeable
            owners.append(int(out["pid"]))
    assert owners[0] != owners[1] and owners == owners[:2] * 3
    assert model.stats()["bytes_copied_in"] == 6 * 8, "only the 8-byte `hold` is copied"


def test_seal_makes_a_replica_buffer_read_only(open_set):
    model = open_set()
    buffer = model.seal(model.empty("x", (3,)))
    assert not buffer.flags.writeable
    with pytest.raises(ValueError):
        buffer[0] = 1.0


def test_inputs_are_checked_before_dispatch(open_set):
    model = open_set()
    with pytest.raises(ope.SpecError, match="'x'"):
        model.submit({"x": np.zeros(3, np.float64), "hold": np.array(0.0)})
    with pytest.raises(ope.SpecError):
        model.empty("nope", (3,))
    assert [r["calls"] for r in model.stats()["replicas"]] == [0, 0]


def test_infer_async_under_asyncio(open_set):
    model = open_set()

    async def main():
        return await asyncio.gather(*(model.infer_async(whoami_inputs(i)) for i in range(4)))

    results = asyncio.run(main())
    assert [r["y"][0] for r in results] == [1, 2, 3, 4]
    assert {int(r["pid"]) for r in results} == set(model.stats()["pids"])


def test_stats_and_health_describe_every_replica(open_set):
    model = open_set()
    served_by(model, 4)
    stats, health = model.stats(), model.health()
    assert stats["calls"] == 4 and stats["errors"] == 0 and stats["latency_p50_us"] > 0
    assert [r["pid"] for r in stats["replicas"]] == stats["pids"]
    assert [r["outstanding"] for r in stats["replicas"]] == [0, 0]
    assert health["mode"] == "replicas" and health["state"] == "ready"
    assert [h["pid"] for h in health["replicas"]] == stats["pids"]


def test_close_closes_every_replica_and_is_idempotent(open_set):
    model = open_set()
    model.close()
    model.close()
    assert model.health()["state"] == "closed"
    assert all(h["state"] == "closed" for h in model.health()["replicas"])
    with pytest.raises(ope.ModelClosed):
        model.infer(whoami_inputs())
    with pytest.raises(ope.ModelClosed):
        model.empty("x", (3,))


def test_one_replica_failing_to_load_closes_the_others_and_raises(open_set, tmp_path):
    with pytest.raises(ope.OpeError, match="chosen to fail"):
        open_set(env_vars={"WHOAMI_FAIL_ONE": str(tmp_path / "claim")})
    # the leak check (conftest) sees that the replica which did start was stopped


def test_a_package_that_cannot_load_raises_its_error(open_set, package_root):
    package = read_package(fault_package(str(package_root), name="load-crash", load="crash"))
    with pytest.raises(ope.WorkerCrashed, match="code 7"):
        open_set(package=package)


@pytest.mark.parametrize("replicas", [0, -1, True, 1.5])
def test_replicas_must_be_a_positive_int(whoami, replicas):
    with pytest.raises(ValueError, match="replicas"):
        ope.load(whoami.path, replicas=replicas)


def _wait_until_all_ready(model, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(h["state"] == "ready" for h in model.health()["replicas"]):
            return
        time.sleep(0.02)  # polling a state the supervisor thread changes; not synchronising work
    raise AssertionError(f"replicas not ready: {model.health()['replicas']}")
