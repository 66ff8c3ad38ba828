"""Models placed on a Ray cluster (ope.load(path, placement=...)): the same results, errors
and faults as local models, on either node of a two-node cluster on this machine
(tests/ray/conftest.py), and nothing left behind by close()."""

import asyncio
import os

import numpy as np
import psutil
import pytest

import ope
import models
from ray_cluster import NODE_ARGS, ope_actors, require_ray, settled
from fault_package import assert_works, fault_inputs

require_ray()
import ray  # noqa: E402


def on(resource):
    """A placement on the node offering ``resource`` (conftest: "node_a" or "node_b")."""
    return ope.RayPlacement(resources={resource: 1})


@pytest.fixture
def placed(cluster):
    """Load models placed on the cluster; closed at teardown."""
    opened = []

    def load(path, placement, **options):
        model = ope.load(path, placement=placement, **options)
        opened.append(model)
        return model

    yield load
    for model in opened:
        model.close()


@pytest.mark.parametrize("resource", ["node_a", "node_b"])
def test_a_model_placed_by_resource_runs_on_that_node_with_local_results(placed, nodes,
                                                                        affine, resource):
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    model = placed(affine.path, on(resource))
    with ope.load(affine.path) as local:
        np.testing.assert_array_equal(model.infer({"x": x})["y"], local.infer({"x": x})["y"])
    stats, health = model.stats(), model.health()
    assert stats["node"] == health["node"] == nodes[resource]
    assert stats["node_ip"] == "127.0.0.1"
    assert stats["calls"] == 1 and stats["errors"] == 0 and stats["mode"] == "ray"
    assert psutil.pid_exists(stats["pid"])  # the node's ope worker
    assert health["open"] and health["state"] == "ready"


def test_a_model_set_places_each_model_where_asked_with_local_results(cluster, nodes, affine,
                                                                      gated, probe):
    obs = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    inputs = {"affine": {"x": obs}, "gated": {"obs": obs, "gain": np.float32(1.5)},
              "probe": {"x": obs[:, :2], "behaviour": "ok"}}
    specs = {"affine": affine.path, "gated": gated.path, "probe": probe.path}
    with ope.ModelSet(specs) as local:
        expected = local.infer_all(inputs)
    with ope.ModelSet({"affine": (affine.path, {"placement": on("node_a")}),
                       "gated": (gated.path, {"placement": on("node_b")}),
                       "probe": probe.path}) as mixed:
        got = mixed.infer_all(inputs)
        assert mixed["affine"].stats()["node"] == nodes["node_a"]
        assert mixed["gated"].stats()["node"] == nodes["node_b"]
        assert "node" not in mixed["probe"].stats()  # no placement: this host
    for name, outputs in expected.items():
        for key, value in outputs.items():
            np.testing.assert_array_equal(got[name][key], value)


def test_submit_futures_and_infer_async_return_the_outputs(placed, affine):
    model = placed(affine.path, on("node_b"))
    xs = [np.full((2, 4), k, np.float32) for k in range(6)]
    futures = [model.submit({"x": x}) for x in xs]
    for x, future in zip(xs, futures):
        np.testing.assert_allclose(future.result(30)["y"], models.affine_reference(x), rtol=1e-6)

    async def both():
        return await asyncio.gather(*(model.infer_async({"x": x}) for x in xs[:2]))

    for x, outputs in zip(xs, asyncio.run(both())):
        np.testing.assert_allclose(outputs["y"], models.affine_reference(x), rtol=1e-6)
    assert model.stats()["calls"] == 8


def test_empty_and_seal_give_ordinary_arrays_that_calls_take(placed, affine):
    model = placed(affine.path, "ray")
    x = model.empty("x", (2, 4))
    x[...] = 1.0
    model.seal(x)
    assert not x.flags.writeable
    np.testing.assert_allclose(model.infer({"x": x})["y"], models.affine_reference(x), rtol=1e-6)


@pytest.mark.parametrize("behaviour, error", [("raise", ope.ModelError),
                                              ("wrong_dtype", ope.SpecError)])
def test_the_models_own_error_arrives_unchanged(placed, probe, behaviour, error):
    inputs = {"x": np.ones((2, 2), np.float32), "behaviour": behaviour}
    with ope.load(probe.path) as local, pytest.raises(error) as there:
        local.infer(inputs)
    model = placed(probe.path, on("node_a"))
    with pytest.raises(error) as here:
        model.infer(inputs)
    assert type(here.value) is type(there.value)
    assert str(here.value).splitlines()[0] == str(there.value).splitlines()[0]
    assert model.infer({"x": np.ones((2, 2), np.float32), "behaviour": "ok"})["y"].shape == (2, 2)
    with pytest.raises(ope.SpecError):  # checked on the host, before anything is sent
        model.infer({"x": np.ones((2, 3), np.float32), "behaviour": "ok"})


def test_a_crash_of_the_nodes_worker_raises_worker_crashed_and_the_next_call_is_served(
        placed, faulty):
    model = placed(faulty, on("node_b"), timeout_s=10.0, stop_grace_s=0.5)
    first = model.stats()["pid"]
    with pytest.raises(ope.WorkerCrashed):
        model.infer(fault_inputs("sigkill"))
    assert_works(model)
    stats = model.stats()
    assert stats["pid"] != first and stats["restarts"] == 1 and stats["actor_restarts"] == 0


def test_a_killed_actor_raises_worker_crashed_and_the_next_call_places_a_new_one(placed, faulty):
    model = placed(faulty, on("node_a"), timeout_s=10.0)
    name = model.stats()["actor"]
    ray.kill(ray.get_actor(name), no_restart=True)
    with pytest.raises(ope.WorkerCrashed, match="actor died"):
        model.infer(fault_inputs("ok"))
    assert_works(model)
    stats = model.stats()
    assert stats["actor"] != name and stats["actor_restarts"] == 1


def test_an_actor_lost_past_the_restart_policy_leaves_the_model_broken(placed, faulty):
    model = placed(faulty, on("node_b"), max_restarts=0)
    ray.kill(ray.get_actor(model.stats()["actor"]), no_restart=True)
    with pytest.raises(ope.WorkerCrashed, match="actor died"):
        model.infer(fault_inputs("ok"))
    with pytest.raises(ope.ModelBroken, match="lost more than 0 times"):
        model.infer(fault_inputs("ok"))
    assert model.health()["state"] == "broken"


def test_a_lost_node_raises_worker_crashed_node_lost_and_the_model_recovers_elsewhere(
        cluster, placed, nodes, faulty):
    # "spare" is on node_b and on a third node; holding node_b's sends the model to the third.
    class Holder:  # defined here, so Ray ships it by value
        def ready(self):
            return True

    holder = ray.remote(num_cpus=0, resources={"spare": 1})(Holder).remote()
    third = cluster.add_node(**NODE_ARGS, resources={"spare": 1})
    ray.get(holder.ready.remote())
    model = placed(faulty, ope.RayPlacement(resources={"spare": 1}, num_cpus=0.5))
    lost_node = model.stats()["node"]
    assert lost_node not in nodes.values()
    ray.kill(holder)
    cluster.remove_node(third)
    with pytest.raises(ope.WorkerCrashed, match="node lost") as crashed:
        model.infer(fault_inputs("ok"))
    assert lost_node in str(crashed.value)
    assert_works(model)
    assert model.health()["node"] == nodes["node_b"]


def test_resources_no_node_offers_raise_env_error_at_load(cluster, affine):
    with pytest.raises(ope.EnvError, match="no Ray node offers"):
        ope.load(affine.path, placement=ope.RayPlacement(resources={"tpu_pod": 1}))
    with pytest.raises(ope.EnvError, match="no Ray node offers"):
        ope.load(affine.path, placement=ope.RayPlacement(num_cpus=64))
    assert ope_actors() == set()


def test_a_hung_model_raises_worker_timeout_and_the_next_call_is_served(placed, faulty):
    model = placed(faulty, on("node_a"), stop_grace_s=0.5)
    with pytest.raises(ope.WorkerTimeout):
        model.infer(fault_inputs("sleep", x=(60.0, 0.0)), timeout_s=1.0)
    assert model.health()["open"]
    assert_works(model)


def test_health_and_close_do_not_wait_behind_a_stuck_call(placed, faulty):
    model = placed(faulty, on("node_b"), stop_grace_s=0.5)
    stuck = model.submit(fault_inputs("sleep", x=(60.0, 0.0)))
    assert model.health()["open"] and not stuck.done()
    model.close()
    with pytest.raises(ope.OpeError):
        stuck.result(30)


def test_replicas_spread_calls_over_actors_and_name_their_nodes(placed, affine, nodes):
    model = placed(affine.path, ope.RayPlacement(num_cpus=0.5), replicas=2)
    x = np.ones((2, 4), np.float32)
    futures = [model.submit({"x": x}) for _ in range(8)]
    for future in futures:
        np.testing.assert_allclose(future.result(30)["y"], models.affine_reference(x), rtol=1e-6)
    replicas = model.stats()["replicas"]
    assert all(r["calls"] > 0 and r["node"] in nodes.values() for r in replicas)
    assert all(h["node"] in nodes.values() for h in model.health()["replicas"])


def test_files_sent_through_the_object_store_serve_the_model(placed, affine):
    model = placed(affine.path, ope.RayPlacement(share="files"))
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(model.infer({"x": x})["y"], models.affine_reference(x), rtol=1e-6)


def test_ope_placement_ray_places_every_load_of_the_job(cluster, affine, monkeypatch):
    monkeypatch.setenv("OPE_PLACEMENT", "ray")
    with ope.load(affine.path) as model:
        assert model.stats()["mode"] == "ray"
    with ope.load(affine.path, placement="local") as model:
        assert "node" not in model.stats()


def test_the_sim_job_runs_with_its_models_on_two_nodes(cluster, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
    import sim_job
    assert sim_job.main(["--ticks", "30", "--agents", "16", "--placement", "ray",
                         "--ray-resources", "node_a,node_b"]) == 0
    summary = capsys.readouterr().out
    assert "ticks: 30 (16 agents)" in summary and "finite: True" in summary


def test_close_leaves_no_actor_no_worker_and_no_segment(placed, affine):
    model = placed(affine.path, on("node_a"))
    stats = model.stats()
    actor_pid, worker_pid = stats["actor_pid"], stats["pid"]
    model.close()
    assert settled(lambda: {pid for pid in (actor_pid, worker_pid) if _running(pid)}) == set()
    with pytest.raises(ope.ModelClosed):
        model.infer({"x": np.ones((1, 4), np.float32)})


def _running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
