"""examples/frameworks.py, run as a user runs it: every kind of model answers, side by side,
with the result its framework gives when called directly. The TensorFlow and numpy-1 models
need environments built from their packages' locks, so they run in the slow suite (and need
the package registry, like the environment tests)."""

import os
import subprocess
import sys

import pytest

from envs_support import skip_unless_buildable, torch_policy  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "frameworks.py")
HOST_KINDS = ("torch_export", "torchscript", "onnx", "keras")


def run_example(*args, env=None):
    process = subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                             timeout=1500, env=env)
    assert process.returncode == 0, process.stderr
    return process.stdout


def answered(out, kind):
    return any(line.startswith(kind + " ") and "matches the framework called directly" in line
               for line in out.splitlines())


def test_host_frameworks_answer_side_by_side():
    out = run_example("--without", "tensorflow,numpy1")
    assert all(answered(out, kind) for kind in HOST_KINDS), out
    pids = {line.split()[-6] for line in out.splitlines() if "matches" in line}
    assert len(pids) == len(HOST_KINDS), "each model in a worker of its own"


@pytest.mark.slow
def test_tensorflow_and_numpy_1_get_their_environments_built(torch_policy, tmp_path):
    skip_unless_buildable()
    env = {**os.environ, "OPE_CONSTRAINTS": torch_policy, "OPE_HOME": str(tmp_path / "home")}
    out = run_example(env=env)
    assert all(answered(out, kind) for kind in (*HOST_KINDS, "tensorflow", "numpy1")), out
    assert " 3.10." in next(line for line in out.splitlines() if line.startswith("numpy1 "))
