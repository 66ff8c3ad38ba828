"""Worker environments: two numpy majors and two Pythons served side by side, selection from
a package's requires, devices and resources seen from inside the worker, the version
handshake, and the ``ope env`` command.

Two environments are built once and cached across runs under ``$OPE_TEST_HOME`` (default
``~/.cache/ope-tests``): "np1" (Python 3.10, numpy 1.26) and "np2" (this Python, numpy 2).
Each is rebuilt only when ope's version or source fingerprint differs from the one it was
built from (both are in its record). Building needs the package registry: without it these
tests skip, saying so; with ``CI=true`` they fail instead.
"""

import concurrent.futures
import os
import platform
import sys

import numpy as np
import pytest
import torch

import ope
from ope import EnvError, ProtocolError, RequirementError, TensorSpec, envs
from ope.bridge import protocol
from ope.install_policy import load_policy
from ope.cli import main

import models
from envs_support import CACHE_HOME, HOST_MINOR, own_home, skip_unless_buildable, torch_policy  # noqa: F401

# name -> (python, requires): one other Python minor with numpy 1, this Python with numpy 2.
CACHED_ENVS = {"np1": ("3.10", ["numpy==1.26.*"]),
               "np2": (platform.python_version(), ["numpy>=2"])}

_RUNTIME_SOURCE = '''
import os, platform, sys

import numpy as np


def factory(data_dir):
    def report(x, names):
        return {"y": x * 2,
                "numpy": np.array(np.__version__),
                "python": np.array(platform.python_version()),
                "ope": np.array(os.path.dirname(sys.modules["ope"].__file__)),
                "env": np.array([os.environ.get(str(n), "<unset>") for n in names]),
                "cpus": np.array(sorted(os.sched_getaffinity(0)), np.int64)}
    return report
'''

_RUNTIME_OUTPUTS = [TensorSpec("y", "float32", ("n",)), TensorSpec("numpy", "string", ()),
                    TensorSpec("python", "string", ()), TensorSpec("ope", "string", ()),
                    TensorSpec("env", "string", ("k",)), TensorSpec("cpus", "int64", (None,))]

_TORCH_SOURCE = '''
import torch


def factory(data_dir):
    def report(x):
        return {"y": torch.tanh(x), "threads": torch.tensor(torch.get_num_threads()),
                "torch": __import__("numpy").array(torch.__version__)}
    return report
'''


def runtime_package(root, name, requires):
    """Reports the numpy and Python it runs with, where its ope lives, the environment
    variables named in ``names`` and its CPU affinity; y = 2x. Made without a lock: these
    tests are about choosing among recorded environments (locks: test_locked_envs.py)."""
    return models.numpy_package(
        root, _RUNTIME_SOURCE, name=name, requires=requires, outputs=_RUNTIME_OUTPUTS, lock=False,
        inputs=[TensorSpec("x", "float32", ("n",)), TensorSpec("names", "string", ("k",))])


def report(model, *names):
    outputs = model.infer({"x": np.arange(3, dtype=np.float32), "names": list(names) or [""]})
    np.testing.assert_array_equal(outputs["y"], [0, 2, 4])
    return {key: value.tolist() for key, value in outputs.items()}


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cached_envs(torch_policy):
    """Build (or reuse) np1 and np2 under CACHE_HOME, both at once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(envs.HOME_ENV, CACHE_HOME)
        patch.setenv("OPE_CONSTRAINTS", torch_policy)
        missing = [name for name in CACHED_ENVS if not _up_to_date(name)]
        if missing:
            skip_unless_buildable()
            with concurrent.futures.ThreadPoolExecutor(len(missing)) as pool:
                for done in [pool.submit(_rebuild, name) for name in missing]:
                    done.result()


@pytest.fixture
def worker_envs(cached_envs, monkeypatch):
    """OPE_HOME holding exactly the cached np1 and np2 environments."""
    monkeypatch.setenv(envs.HOME_ENV, CACHE_HOME)
    return {name: envs.get(name) for name in CACHED_ENVS}


def _up_to_date(name):
    python, requires = CACHED_ENVS[name]
    try:
        env = envs.get(name)
    except EnvError:
        return False
    return (env.ope_version == ope.__version__ and env.stale is False
            and env.requires == requires and env.python_version.startswith(python))


def _rebuild(name):
    python, requires = CACHED_ENVS[name]
    if os.path.isdir(os.path.join(CACHE_HOME, "envs", name)):
        envs.remove(name)
    envs.create(name, python=python, requires=requires,
                log=lambda line: print(f"[{name}] {line}"))


@pytest.fixture(scope="module")
def packages(package_root):
    root = str(package_root)
    return {"np1": runtime_package(root, "wants-numpy1", {"numpy": "<2"}),
            "np2": runtime_package(root, "wants-numpy2", {"numpy": ">=2"}),
            "any": runtime_package(root, "wants-anything", {}),
            "old-python": runtime_package(root, "wants-old-python", {"python": "<3.11"}),
            "impossible": runtime_package(root, "wants-numpy0", {"numpy": "<1"}),
            "torch": models.numpy_package(
                root, _TORCH_SOURCE, name="torch-report", framework="torch",
                inputs=[TensorSpec("x", "float32", ("n",))],
                outputs=[TensorSpec("y", "float32", ("n",)), TensorSpec("threads", "int64", ()),
                         TensorSpec("torch", "string", ())])}


# --- conflicting frameworks side by side ---------------------------------------------------

def test_numpy_1_and_numpy_2_served_side_by_side(worker_envs, packages):
    with ope.load(packages["np1"].path) as old, ope.load(packages["np2"].path) as new:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            old_report, new_report = pool.map(report, [old, new])
        assert old_report["numpy"].startswith("1.26.") and old_report["python"].startswith("3.10.")
        assert new_report["numpy"].startswith("2.")
        assert new_report["python"] == platform.python_version()
        assert old.stats()["worker"]["numpy"] == old_report["numpy"]
        assert old.stats()["worker"]["executable"] == worker_envs["np1"].python


def test_torch_model_next_to_a_numpy_1_model(worker_envs, packages):
    with ope.load(packages["torch"].path) as net, ope.load(packages["np1"].path) as old:
        outputs = net.infer({"x": np.zeros(2, np.float32)})
        assert outputs["torch"].item() == torch.__version__
        assert report(old)["numpy"].startswith("1.26.")
        assert net.stats()["worker"]["executable"] == sys.executable


def test_env_worker_runs_its_own_ope_and_gets_env_vars(worker_envs, packages):
    # The host's folder (the source tree, when tests run from it) must not shadow the env's ope.
    with ope.load(packages["np1"].path, env_vars={"OPE_TEST_MARK": "seen"}) as model:
        seen = report(model, "OPE_TEST_MARK")
    assert seen["ope"].startswith(os.path.join(CACHE_HOME, "envs", "np1"))
    assert seen["env"] == ["seen"]


# --- selection -------------------------------------------------------------------------------

def test_auto_prefers_the_host_interpreter(worker_envs, packages):
    # np2 satisfies numpy>=2 too, but the host does, and the host comes first.
    with ope.load(packages["np2"].path) as model:
        assert model.stats()["worker"]["executable"] == sys.executable


def test_auto_checks_the_python_version(worker_envs, packages):
    with ope.load(packages["old-python"].path, env="auto") as model:
        assert report(model)["python"].startswith("3.10.")


def test_auto_error_lists_each_candidate(worker_envs, packages):
    with pytest.raises(EnvError) as caught:
        ope.load(packages["impossible"].path)
    message = str(caught.value)
    assert "'wants-numpy0'" in message and "ope env create" in message
    assert f"this host's interpreter {sys.executable}: numpy<1: found {np.__version__}" in message
    assert "env 'np1' (Python 3.10." in message and "numpy<1: found 1.26." in message
    assert "env 'np2'" in message


def test_auto_error_without_environments_names_the_host(packages):
    with pytest.raises(EnvError, match=r"this host's interpreter .*numpy<2: found 2\."):
        ope.load(packages["np1"].path)


def test_env_name_forces_that_environment(worker_envs, packages):
    with ope.load(packages["any"].path, env="np2") as model:
        assert model.stats()["worker"]["executable"] == worker_envs["np2"].python


def test_forced_environment_still_checks_requires(worker_envs, packages):
    with pytest.raises(RequirementError, match=r"numpy<2: found 2\."):
        ope.load(packages["np1"].path, env="np2")


def test_env_path_forces_that_interpreter(worker_envs, packages):
    venv = os.path.dirname(os.path.dirname(worker_envs["np1"].python))
    with ope.load(packages["any"].path, env=venv) as model:
        assert report(model)["numpy"].startswith("1.26.")


def test_unknown_environment_name(packages):
    with pytest.raises(EnvError, match=r"no worker environment named 'nope' .*known: none"):
        ope.load(packages["any"].path, env="nope")


def test_in_process_requirement_error_points_to_environments(packages):
    with pytest.raises(RequirementError, match=r"numpy<2: found .*ope env create"):
        ope.load(packages["np1"].path, out_of_process=False)


def test_in_process_refuses_worker_placement(packages):
    with pytest.raises(TypeError, match="options env apply only out of process"):
        ope.load(packages["any"].path, out_of_process=False, env="auto", device="cpu")


def test_python_and_env_together_are_refused(packages):
    with pytest.raises(TypeError, match="env= or python="):
        ope.load(packages["any"].path, env="np1", python=sys.executable)


# --- devices and resources, observed from inside the worker -------------------------------

@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """Puts an nvidia-smi that prints ``text`` (exit ``status``) first on PATH."""
    def install(text, status=0):
        script = tmp_path / "bin" / "nvidia-smi"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!/bin/sh\nprintf '{text}'\nexit {status}\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return install


def test_cpu_device_cpus_threads_and_env_vars_seen_by_the_worker(packages):
    options = dict(device="cpu", cpus=[0], threads=1, env_vars={"OPE_TEST_MARK": "seen"})
    with ope.load(packages["any"].path, **options) as model:
        seen = report(model, "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "OPE_TEST_MARK")
    assert seen["env"] == ["", "1", "seen"]
    assert seen["cpus"] == [0]


def test_threads_set_torch_intra_op_threads(packages):
    with ope.load(packages["torch"].path, threads=2) as model:
        assert model.infer({"x": np.zeros(1, np.float32)})["threads"].item() == 2


def test_cuda_device_prefers_the_gpu_uuid(packages, fake_nvidia_smi):
    fake_nvidia_smi("0, GPU-aaaa\\n1, GPU-bbbb\\n")
    with ope.load(packages["any"].path, device="cuda:1") as model:
        assert report(model, "CUDA_VISIBLE_DEVICES")["env"] == ["GPU-bbbb"]


def test_cuda_device_without_nvidia_smi_uses_the_index(fake_nvidia_smi):
    fake_nvidia_smi("NVIDIA-SMI has failed", status=9)  # as on a machine without a driver
    assert envs.device_env_vars("cuda:1") == {"CUDA_VISIBLE_DEVICES": "1",
                                              "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert envs.device_env_vars("cuda")["CUDA_VISIBLE_DEVICES"] == "0"


def test_missing_or_malformed_device(packages, fake_nvidia_smi):
    fake_nvidia_smi("0, GPU-aaaa\\n")
    with pytest.raises(EnvError, match="there is no GPU 3 .nvidia-smi lists 0"):
        ope.load(packages["any"].path, device="cuda:3")
    with pytest.raises(ValueError, match="device must be"):
        ope.load(packages["any"].path, device="gpu0")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        ope.load(packages["any"].path, device="cpu", env_vars={"CUDA_VISIBLE_DEVICES": "0"})


# --- the version handshake -------------------------------------------------------------------

@pytest.mark.parametrize("env", ["auto", "np1"])
def test_handshake_rejects_another_protocol_version(worker_envs, packages, monkeypatch, env):
    monkeypatch.setattr(protocol, "VERSION", protocol.VERSION + 1)  # the host moves on alone
    with pytest.raises(ProtocolError, match=r"worker runtime speaks protocol \d+, this host \d+"):
        ope.load(packages["any"].path, env=env)


# --- the ope env command ---------------------------------------------------------------------

def test_env_list_shows_python_and_key_versions(worker_envs, capsys):
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    assert "np1" in out and "Python 3.10." in out and "numpy 1.26." in out
    assert f"Python {platform.python_version()}" in out and "ope 0.1.0" in out


def test_env_register_list_remove(capsys):
    assert main(["env", "register", "here", sys.executable]) == 0
    assert main(["env", "list"]) == 0
    out = capsys.readouterr().out
    assert "registered environment 'here'" in out and f"torch {torch.__version__}" in out
    assert main(["env", "remove", "here"]) == 0
    assert main(["env", "remove", "here"]) == 1
    assert "no worker environment named 'here'" in capsys.readouterr().err


def test_env_create_errors_name_the_cause(capsys):
    assert main(["env", "create", "x", "--python", "2.9"]) == 1
    assert "no Python 2.9 found" in capsys.readouterr().err
    assert main(["env", "create", "x", "--python", "3.10", "--require", "torch"]) == 1
    assert "torch<0" in capsys.readouterr().err  # the policy's constraint, not a download
    assert main(["env", "create", "auto"]) == 1
    assert "not allowed" in capsys.readouterr().err
    assert envs.list_envs() == []


def test_failed_create_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv(envs.TOOL_ENV, "pip")  # venv's own step is the one that fails
    # An interpreter that reports itself but whose venv step fails half-way.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-I" ]; then exec {sys.executable} "$@"; fi\n'
                    'mkdir -p "$3/half-made"; echo "venv exploded"; exit 3\n')
    fake.chmod(0o755)
    with pytest.raises(EnvError, match=r"creating the venv of 'broken' failed[\s\S]*venv exploded"):
        envs.create("broken", python=str(fake), log=lambda line: None)
    assert not os.path.exists(os.path.join(envs.ope_home(), "envs", "broken"))


@pytest.mark.slow
def test_env_create_and_remove_from_the_command_line(capsys):
    assert main(["env", "create", "tiny", "--python", HOST_MINOR]) == 0
    assert "created environment 'tiny'" in capsys.readouterr().out
    assert envs.get("tiny").packages["ope"] == ope.__version__
    assert main(["env", "remove", "tiny"]) == 0


# --- install policy ----------------------------------------------------------------------------

def test_install_policy_from_ope_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("OPE_INDEX_URL", "https://index.example/simple")
    monkeypatch.setenv("OPE_EXTRA_INDEX_URLS", "file:///a/simple file:///b/simple")
    monkeypatch.setenv("OPE_FIND_LINKS", f"/w1{os.pathsep}/w2")
    monkeypatch.setenv("OPE_CONSTRAINTS", "")  # set but empty: none, not pip's
    policy = load_policy()
    assert (policy.index_url, policy.extra_index_urls, policy.find_links,
            policy.constraints) == ("https://index.example/simple",
                                    ("file:///a/simple", "file:///b/simple"), ("/w1", "/w2"), ())
    assert policy.uv_args() == [
        "--no-config", "--index-url", "https://index.example/simple",
        "--extra-index-url", "file:///a/simple", "--extra-index-url", "file:///b/simple",
        "--index-strategy", "unsafe-best-match", "--find-links", "/w1", "--find-links", "/w2"]
    assert policy.pip_args()[:2] == ["--index-url", "https://index.example/simple"]
    assert policy.tool_env()["PIP_CONFIG_FILE"] == os.devnull


def test_install_policy_from_the_config_file_and_pip(monkeypatch, tmp_path):
    monkeypatch.delenv("OPE_CONSTRAINTS")
    monkeypatch.setenv("OPE_FIND_LINKS", "/from-variable")  # variables win over the file
    (tmp_path / "ope-home").mkdir()
    (tmp_path / "ope-home" / "config.toml").write_text(
        '[install]\nindex-url = "https://config.example/simple"\n'
        'find-links = ["/from-file"]\nconstraints = ["c.txt"]\n')
    # Nothing configured for ope: pip's own setting is the fallback.
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///pip/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    policy = load_policy()
    assert policy.index_url == "https://config.example/simple"
    assert policy.find_links == ("/from-variable",)
    assert policy.constraints == (str(tmp_path / "ope-home" / "c.txt"),)
    assert policy.extra_index_urls == ("file:///pip/simple",)
    assert policy.sources["extra_index_urls"] == "pip config"
    (tmp_path / "ope-home" / "config.toml").write_text('[install]\nindex = "x"\n')
    with pytest.raises(EnvError, match=r"unknown \[install\] setting\(s\) index"):
        load_policy()
