"""ModelSet and wait_all: many models loaded at once, called together, closed together.

Parallel start is shown by a load-time rendezvous (see test_replicas.whoami_package), parallel
calls by the calls' own reported spans overlapping; no test depends on how long anything takes.
"""

import concurrent.futures

import numpy as np
import pytest

import ope
from ope.modelset import ModelSet, wait_all
from ope.host.replicas import ReplicaSet

from fault_package import fault_inputs, fault_package
from test_replicas import BARRIER_ENV, whoami_inputs, whoami_package


@pytest.fixture(scope="module")
def whoami(package_root):
    return whoami_package(str(package_root))


@pytest.fixture(scope="module")
def faulty(package_root):
    return fault_package(str(package_root))


@pytest.fixture
def open_sets():
    opened = []

    def open_(specs):
        models = ModelSet(specs)
        opened.append(models)
        return models

    yield open_
    for models in opened:
        models.close()


def test_a_set_maps_names_to_loaded_models(open_sets, whoami, faulty):
    models = open_sets({"a": whoami, "b": (faulty, {"timeout_s": 30.0})})
    assert sorted(models) == ["a", "b"] and len(models) == 2 and "a" in models
    assert isinstance(models["a"], ope.Model) and models["b"].timeout_s == 30.0
    assert models["a"].name == "whoami" and models["b"].name == "faults"
    assert set(models.stats()) == set(models.health()) == {"a", "b"}


def test_infer_all_returns_outputs_by_name(open_sets, whoami, faulty):
    models = open_sets({"a": whoami, "b": faulty})
    outputs = models.infer_all({"a": whoami_inputs(1.0), "b": fault_inputs("ok", x=(5.0,))})
    assert outputs["a"]["y"][0] == 2.0 and outputs["b"]["y"][0] == 6.0
    only_a = models.infer_all({"a": whoami_inputs(7.0)})
    assert list(only_a) == ["a"]


def test_models_of_a_set_run_in_parallel(open_sets, whoami):
    models = open_sets({"a": whoami, "b": whoami})
    outputs = models.infer_all({name: whoami_inputs(hold=0.5) for name in models})
    span_a, span_b = outputs["a"]["span"], outputs["b"]["span"]
    assert span_a[0] < span_b[1] and span_b[0] < span_a[1], "the two calls did not overlap"
    assert int(outputs["a"]["pid"]) != int(outputs["b"]["pid"])


def test_models_of_a_set_start_in_parallel(open_sets, whoami, tmp_path):
    barrier = {"env_vars": {BARRIER_ENV[0]: str(tmp_path), BARRIER_ENV[1]: "3"}}
    models = open_sets({"a": (whoami, barrier), "b": (whoami, barrier), "c": (whoami, barrier)})
    outputs = models.infer_all({name: whoami_inputs() for name in models})
    assert all(bool(out["met"]) for out in outputs.values()), "workers were not loading at once"


def test_options_reach_the_loader_including_replicas_and_mode(open_sets, whoami):
    models = open_sets({"pair": (whoami, {"replicas": 2}),
                        "local": (whoami, {"out_of_process": False})})
    assert isinstance(models["pair"], ReplicaSet) and len(set(models["pair"].stats()["pids"])) == 2
    assert models["local"].health()["mode"] == "in_process"
    outputs = models.infer_all({"pair": whoami_inputs(1.0), "local": whoami_inputs(2.0)})
    assert outputs["pair"]["y"][0] == 2.0 and outputs["local"]["y"][0] == 3.0


def test_a_load_failure_closes_the_models_already_loaded(whoami, package_root):
    broken = fault_package(str(package_root), name="load-crash", load="crash")
    with pytest.raises(ope.WorkerCrashed, match="code 7") as caught:
        ModelSet({"good": whoami, "other": whoami, "bad": broken})
    assert any("'bad'" in note for note in caught.value.__notes__)
    # the leak check (conftest) sees that the two good workers were stopped


def test_a_bad_spec_is_a_type_error(whoami):
    with pytest.raises(TypeError, match="'a'"):
        ModelSet({"a": (whoami, {}, "extra")})


def test_closing_the_set_closes_every_model(whoami, faulty):
    with ModelSet({"a": whoami, "b": faulty}) as models:
        a, b = models["a"], models["b"]
    for model in (a, b):
        assert model.health()["state"] == "closed"
    with pytest.raises(ope.ModelClosed):
        a.infer(whoami_inputs())
    models.close()  # idempotent


def test_submit_all_refuses_unknown_names_and_bad_inputs_before_running(open_sets, whoami,
                                                                        faulty):
    models = open_sets({"a": whoami, "b": faulty})
    with pytest.raises(KeyError, match="'c'"):
        models.submit_all({"a": whoami_inputs(), "c": {}})
    with pytest.raises(ope.SpecError):
        models.submit_all({"a": whoami_inputs(), "b": {"fault": np.array(0), "x": np.zeros(2)}})
    assert models["a"].stats()["calls"] == 1  # the accepted call of that batch ran to its end


def test_wait_all_keeps_the_shape_of_what_it_is_given(open_sets, whoami, faulty):
    models = open_sets({"a": whoami, "b": faulty})
    as_dict = wait_all({"b": models["b"].submit(fault_inputs()),
                        "a": models["a"].submit(whoami_inputs(3.0))})
    assert list(as_dict) == ["b", "a"] and as_dict["a"]["y"][0] == 4.0
    as_list = wait_all([models["a"].submit(whoami_inputs(i)) for i in range(3)])
    assert [out["y"][0] for out in as_list] == [1.0, 2.0, 3.0]


def test_wait_all_raises_the_first_error_after_every_call_settled(open_sets, whoami, faulty):
    models = open_sets({"a": whoami, "b": faulty})
    futures = {"b": models["b"].submit(fault_inputs("raise")),
               "a": models["a"].submit(whoami_inputs(hold=0.3))}
    with pytest.raises(ope.ModelError, match="the model says no"):
        wait_all(futures)
    assert futures["a"].done() and futures["a"].exception() is None
    settled = wait_all(futures, return_exceptions=True)
    assert isinstance(settled["b"], ope.ModelError) and settled["a"]["y"][0] == 2.0


def test_wait_all_times_out_without_cancelling(open_sets, faulty):
    models = open_sets({"b": faulty})
    future = models["b"].submit(fault_inputs("sleep", x=(30.0,)))
    with pytest.raises(concurrent.futures.TimeoutError):
        wait_all([future], timeout=0.05)
    assert not future.done()
    models.close()
    with pytest.raises(ope.ModelClosed):
        future.result(timeout=30)


def test_a_crash_in_one_model_leaves_the_others_serving(open_sets, whoami, faulty):
    models = open_sets({"a": whoami, "b": faulty})
    results = wait_all(models.submit_all({"a": whoami_inputs(), "b": fault_inputs("sigkill")}),
                       return_exceptions=True)
    assert isinstance(results["b"], ope.WorkerCrashed) and results["a"]["y"][0] == 2.0
    outputs = models.infer_all({"a": whoami_inputs(), "b": fault_inputs()})
    assert outputs["b"]["y"][0] == 2.0 and models["b"].stats()["restarts"] == 1
