"""Packages that carry their environment: requirements locked at packaging for a Python, the
environment built from the lock on first load (once, under a file lock, shared, never half
made), reused afterwards, pre-built for hosts that must not build, and collected when unused.

Building needs the package registry and a Python 3.10: without them these tests skip, saying
so; with ``CI=true`` they fail instead. Each test has an empty OPE_HOME of its own, so a build
here is a real one (uv's download cache keeps it to seconds).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ope
from ope import EnvError, PackageError, TensorSpec, envs
from ope.cli import main

import models
from envs_support import (CACHE_HOME, HOST_MINOR, OTHER_PYTHON, own_home,  # noqa: F401
                          skip_unless_buildable, torch_policy)

_VERSIONS_SOURCE = """
import platform

import numpy as np


def factory(data_dir):
    def versions(x):
        return {"y": x * 2, "numpy": np.array(np.__version__),
                "python": np.array(platform.python_version())}
    return versions
"""
_INPUTS = [TensorSpec("x", "float32", ("n",))]
_OUTPUTS = [TensorSpec("y", "float32", ("n",)), TensorSpec("numpy", "string", ()),
            TensorSpec("python", "string", ())]


def versions_package(root, name, **options):
    """A numpy model that doubles x and reports the numpy and Python it runs with."""
    return models.numpy_package(str(root), _VERSIONS_SOURCE, name=name, inputs=_INPUTS,
                                outputs=_OUTPUTS, **options)


def versions(model):
    outputs = model.infer({"x": np.arange(3, dtype=np.float32)})
    np.testing.assert_array_equal(outputs["y"], [0, 2, 4])
    return str(outputs["numpy"]), str(outputs["python"])


@pytest.fixture(scope="module")
def numpy1_package(tmp_path_factory, torch_policy):
    """Locked for Python 3.10 with numpy<2, made without test data: packaging builds
    nothing, so the first load in a test's empty OPE_HOME is a fresh machine's first load."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPE_CONSTRAINTS", torch_policy)
        patch.setenv(envs.HOME_ENV, str(tmp_path_factory.mktemp("packaging-home")))
        skip_unless_buildable()
        return versions_package(tmp_path_factory.mktemp("locked"), "numpy1-py310",
                                python=OTHER_PYTHON, requires={"numpy": "<2"})


# --- packaging ----------------------------------------------------------------------------

def test_packaging_locks_requires_for_the_named_python(numpy1_package):
    package = ope.read_package(numpy1_package.path)
    assert package.python == OTHER_PYTHON
    assert package.requires == {"numpy": "<2", "python": f"=={OTHER_PYTHON}.*"}
    lock_text = package.lock_text()
    assert envs.LOCK_FILE in package.files, "the manifest covers the lock"
    assert envs.lock_python(lock_text) == OTHER_PYTHON and "--hash=sha256:" in lock_text
    assert [pin for pin in envs.lock_pins(lock_text) if pin.startswith("numpy==1.")]


def test_auto_locks_only_what_this_interpreter_cannot_run(tmp_path):
    plain = versions_package(tmp_path, "plain", requires={"numpy": ">=1"})
    assert plain.lock_text() is None and plain.python is None
    impossible = versions_package(tmp_path, "unlocked", requires={"numpy": "<1"}, lock=False)
    assert impossible.lock_text() is None


def test_lock_true_locks_a_package_this_host_can_run(tmp_path):
    skip_unless_buildable()
    package = versions_package(tmp_path, "locked-here", requires={"numpy": ">=1"}, lock=True)
    assert envs.lock_python(package.lock_text()) == HOST_MINOR


def test_unresolvable_requirement_is_a_package_error_naming_it(tmp_path):
    skip_unless_buildable()
    with pytest.raises(PackageError, match=r"package 'nothing-fits': cannot lock its "
                                           r"requirements for Python 3.10: .*'numpy==0.0.1'"):
        versions_package(tmp_path, "nothing-fits", python=OTHER_PYTHON,
                         requires={"numpy": "==0.0.1"})
    assert os.listdir(tmp_path) == ["nothing-fits-build"], "no package, no staging left"


@pytest.mark.parametrize("options, message", [
    ({"python": "3"}, r"python must be a version such as \"3.10\", got '3'"),
    ({"python": 3.10}, "python must be a version such as"),
    ({"python": "3.10", "requires": {"python": ">=3"}}, "not both"),
    ({"lock": "yes"}, r"lock must be True, False or \"auto\""),
])
def test_bad_python_or_lock_options_are_refused(tmp_path, options, message):
    with pytest.raises(PackageError, match=message):
        versions_package(tmp_path, "bad", **options)


# --- first load builds, later loads reuse -------------------------------------------------

def test_first_load_builds_the_environment_then_loads_reuse_it(numpy1_package, capfd):
    with ope.load(numpy1_package.path) as model:
        numpy_version, python_version = versions(model)
        assert model.stats()["worker"]["python"].startswith(f"{OTHER_PYTHON}.")
    assert numpy_version.startswith("1.") and np.__version__.startswith("2.")
    assert python_version.startswith(f"{OTHER_PYTHON}.")
    built = capfd.readouterr().err
    assert "building for Python 3.10" in built and ": ready" in built, built
    with ope.load(numpy1_package.path) as model:
        assert versions(model) == (numpy_version, python_version)
    assert "building" not in capfd.readouterr().err, "the second load reuses the environment"
    assert [env.kind for env in envs.list_envs()] == ["locked"]
    assert main(["env", "list", "--json"]) == 0
    assert json.loads(capfd.readouterr().out)[0]["used_by"] == ["numpy1-py310"]


def test_build_off_only_selects_and_says_how_to_prebuild(numpy1_package, monkeypatch, capsys):
    for way in ({"build": False}, {}):
        if not way:
            monkeypatch.setenv(envs.BUILD_ENV, "0")
        with pytest.raises(EnvError, match=r"is not built and building is off[\s\S]*ope env "
                                           r"create --from " + numpy1_package.path):
            ope.load(numpy1_package.path, **way)
    assert envs.list_envs() == []
    assert main(["env", "create", "--from", numpy1_package.path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "locked"
    with ope.load(numpy1_package.path, build=False) as model:
        assert versions(model)[0].startswith("1.")


_LOAD = textwrap.dedent("""
    import sys
    import numpy as np
    import ope
    with ope.load(sys.argv[1]) as model:
        print(model.infer({"x": np.ones(2, np.float32)})["numpy"])
""")


def test_concurrent_first_loads_build_once(numpy1_package):
    racers = [subprocess.Popen([sys.executable, "-c", _LOAD, numpy1_package.path],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in racers]
    assert [proc.returncode for proc in racers] == [0, 0], outputs
    assert all(out.strip().startswith("1.") for out, _ in outputs)
    assert sum("building for Python" in err for _, err in outputs) == 1, outputs
    assert len(envs.list_envs()) == 1


def test_tampered_lock_is_a_package_error(numpy1_package, tmp_path):
    copy = shutil.copytree(numpy1_package.path, tmp_path / "copy")
    lock_file = copy / envs.LOCK_FILE
    lock_file.write_text(lock_file.read_text().replace("numpy==1.", "numpy==2."))
    with pytest.raises(PackageError, match=r"requirements.lock"):
        ope.load(str(copy))


def test_unreachable_index_at_build_is_an_env_error_saying_so(numpy1_package, monkeypatch):
    monkeypatch.setenv("OPE_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("OPE_EXTRA_INDEX_URLS", "")
    monkeypatch.setenv("OPE_FIND_LINKS", "")
    with pytest.raises(EnvError, match=r"cannot build the environment for Python 3.10 from "
                                       r"its lock: the package index is unreachable"):
        ope.load(numpy1_package.path)
    assert envs.list_envs() == []


# --- locks and their environments, below ope.load ------------------------------------------

LOCK_NUMPY1 = ("3.10", ["numpy<2"])


@pytest.fixture(scope="session")
def numpy1_lock(torch_policy):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPE_CONSTRAINTS", torch_policy)
        skip_unless_buildable()
        return envs.lock(LOCK_NUMPY1[1], LOCK_NUMPY1[0])


def test_lock_pins_numpy_1_for_python_3_10(numpy1_lock):
    assert envs.lock_python(numpy1_lock) == "3.10"
    pins = envs.lock_pins(numpy1_lock)
    assert [pin for pin in pins if pin.startswith("numpy==1.26.")]
    assert {pin.split("==")[0] for pin in pins} >= {"msgpack", "psutil", "packaging"}
    assert "--hash=sha256:" in numpy1_lock


def test_lock_without_uv_uses_pip(numpy1_lock, monkeypatch):
    monkeypatch.setenv(envs.TOOL_ENV, "pip")
    text = envs.lock(["numpy<2"], "3.10")
    assert envs.lock_pins(text) == envs.lock_pins(numpy1_lock)
    assert "--hash=sha256:" in text


@pytest.mark.parametrize("tool", ["uv", "pip"])
def test_lock_refuses_what_the_policy_forbids(numpy1_lock, monkeypatch, tool):
    monkeypatch.setenv(envs.TOOL_ENV, tool)
    with pytest.raises(EnvError, match=r"cannot lock 'torch' for Python 3.10: no version is "
                                       r"available under the install policy .*OPE_CONSTRAINTS"):
        envs.lock(["torch"], "3.10")
    with pytest.raises(EnvError, match=r"cannot lock 'numpy==0.0.1' for Python 3.10"):
        envs.lock(["numpy==0.0.1"], "3.10")


def test_ensure_reuses_the_environment(numpy1_lock, monkeypatch):
    # Cached across runs, in a home of its own: it would also satisfy the selection tests.
    monkeypatch.setenv(envs.HOME_ENV, os.path.join(CACHE_HOME, "locked"))
    env = envs.ensure_env(numpy1_lock)
    lines = []
    start = time.perf_counter()
    again = envs.ensure_env(numpy1_lock, "3.10", progress=lines.append)
    assert time.perf_counter() - start < 0.2 and lines == [] and again == env
    assert env.kind == "locked" and env.packages["numpy"].startswith("1.26.")


def test_ensure_without_build_names_the_missing_environment():
    text = "# ope lock for Python 3.10\nnumpy==1.26.4\n"
    with pytest.raises(EnvError, match=r"environment for this lock \(Python 3.10: numpy==1.26.4\) "
                                       r"is missing .*ope env create --from PACKAGE"):
        envs.ensure_env(text, build=False)


def test_unsatisfiable_lock_fails_and_leaves_nothing(numpy1_lock):
    with pytest.raises(EnvError, match=r"cannot build the environment for Python 3.10 from its "
                                       r"lock: a pinned file is not available[\s\S]*numpy"):
        envs.ensure_env("# ope lock for Python 3.10\nnumpy==0.0.1\n")
    assert envs.list_envs() == []
    assert [name for name in os.listdir(os.path.join(envs.ope_home(), "envs"))
            if not name.endswith(".lock")] == []


_ENSURE = ("import sys; from ope import envs; "
           "envs.ensure_env(sys.argv[1], progress=lambda line: print(line, flush=True))")


def _ensuring(lock_text):
    return subprocess.Popen([sys.executable, "-c", _ENSURE, lock_text], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)


def test_killed_build_leaves_nothing_and_concurrent_ensures_build_once(numpy1_lock):
    text = envs.lock([], HOST_MINOR)
    killed = _ensuring(text)
    for line in killed.stdout:
        if "venv created" in line:
            break
    os.killpg(killed.pid, signal.SIGKILL)  # the build and the tools it runs
    killed.wait()
    killed.stdout.close()
    assert envs.list_envs() == []
    with pytest.raises(EnvError, match="is missing"):
        envs.ensure_env(text, build=False)
    racers = [_ensuring(text) for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0] for proc in racers]
    assert [proc.returncode for proc in racers] == [0, 0]
    assert sum("building for Python" in output for output in outputs) == 1
    env = envs.ensure_env(text, build=False)
    assert [e.name for e in envs.list_envs()] == [env.name]
    assert not [name for name in os.listdir(os.path.join(envs.ope_home(), "envs"))
                if name.startswith(".stage-")]


def _fake_locked_env(name, megabytes, days_ago):
    folder = os.path.join(envs.ope_home(), "envs", name)
    os.makedirs(folder)
    record = dict(name=name, kind="locked", python=sys.executable, python_version="3.10.0",
                  packages={}, requires=[], created="2020-01-01T00:00:00+00:00",
                  ope_version="0.1.0")
    with open(os.path.join(folder, "ope-env.json"), "w") as file:
        json.dump(record, file)
    with open(os.path.join(folder, "payload"), "wb") as file:
        file.write(os.urandom(megabytes << 20))
    used = os.path.join(folder, "last-used")
    open(used, "w").close()
    stamp = time.time() - days_ago * 86400
    os.utime(used, (stamp, stamp))


def test_env_gc_removes_only_unused_or_over_budget_locked_envs(capsys):
    _fake_locked_env("lock-old", 1, days_ago=30)
    _fake_locked_env("lock-older", 1, days_ago=60)
    _fake_locked_env("lock-recent", 2, days_ago=1)
    _fake_locked_env("lock-fresh", 1, days_ago=0)
    envs.register("mine", sys.executable)  # the user's: never collected
    os.utime(os.path.join(envs.ope_home(), "envs", "mine", "ope-env.json"), (0, 0))
    wheels = os.path.join(envs.ope_home(), "wheels")
    current = os.path.basename(envs.store.wheel_folder("3.10"))
    for folder in (current, "0123456789abcdef-py3.10"):
        os.makedirs(os.path.join(wheels, folder))
    assert main(["env", "gc", "--unused-days", "7", "--json"]) == 0
    assert os.listdir(wheels) == [current], "wheels of other ope sources are removed"
    assert sorted(json.loads(capsys.readouterr().out)) == ["lock-old", "lock-older"]
    assert envs.gc(max_bytes=2.5 * (1 << 20)) == ["lock-recent"]  # least recently used first
    assert sorted(env.name for env in envs.list_envs()) == ["lock-fresh", "mine"]
    assert main(["env", "list", "--json"]) == 0
    listing = {env["name"]: env for env in json.loads(capsys.readouterr().out)}
    assert listing["lock-fresh"]["size_bytes"] >= 1 << 20
