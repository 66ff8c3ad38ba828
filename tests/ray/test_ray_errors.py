"""What each failure Ray reports means in ope's vocabulary (ope/placement/ray_errors.py):
one table, checked without a cluster."""

import pytest

import ope
from ray_cluster import require_ray
from ope.placement.ray_errors import ope_error

require_ray()
import ray.exceptions as rex  # noqa: E402


def _task_error(cause, as_cause=False):
    error = rex.RayTaskError("infer", "Traceback: ...", cause)
    return error.as_instanceof_cause() if as_cause else error


_NODE_DIED = ("The actor died unexpectedly before finishing this task.\n\tip: 127.0.0.1\n"
              "The actor died because its node has died. Node Id: abc")

# (Ray's exception, ope error type, words its message holds, whether the actor is lost)
TABLE = [
    (rex.ActorDiedError(), ope.WorkerCrashed, "actor died", True),
    (rex.RayActorError(error_msg=_NODE_DIED), ope.WorkerCrashed, "node lost", True),
    (rex.NodeDiedError("node abc is dead"), ope.WorkerCrashed, "node lost", True),
    (rex.GetTimeoutError("get timed out"), ope.WorkerTimeout, "cancelled", False),
    (rex.OutOfMemoryError("low on memory"), ope.MemoryLimitExceeded, "low on memory", False),
    (rex.ObjectStoreFullError("no room"), ope.ArenaFull, "object store is full", False),
    (rex.ActorUnschedulableError("infeasible"), ope.EnvError, "cannot place", False),
    (rex.RuntimeEnvSetupError("pip failed"), ope.EnvError, "pip failed", False),
    (_task_error(RuntimeError("actor code")), ope.WorkerCrashed, "outside ope", True),
]


@pytest.mark.parametrize("exc, kind, words, lost", TABLE,
                         ids=[type(row[0]).__name__ for row in TABLE])
def test_rays_failures_become_the_ope_error_of_the_same_meaning(exc, kind, words, lost):
    error, actor_lost = ope_error(exc, model="m", node="node-7")
    assert type(error) is kind
    assert words in str(error) and "'m'" in str(error) and "node-7" in str(error)
    assert actor_lost is lost


@pytest.mark.parametrize("cause", [
    ope.ModelError("model raised: boom", error_type="ValueError", traceback_text="tb"),
    ope.SpecError("output 'y': expected float32, got float64"),
    ope.ArenaFull("tensor 'x' does not fit"), ope.WorkerTimeout("past its deadline"),
    ope.WorkerCrashed("worker killed by SIGKILL", exitcode=-9),
    ope.ModelBroken("failed too often")])
@pytest.mark.parametrize("as_cause", [False, True])
def test_the_models_own_error_arrives_unchanged(cause, as_cause):
    error, actor_lost = ope_error(_task_error(cause, as_cause), model="m", node="node-7")
    assert error is cause and not actor_lost


def test_an_error_not_from_ray_is_left_as_it_is():
    exc = ValueError("not Ray's")
    assert ope_error(exc, model="m", node=None) == (exc, False)
