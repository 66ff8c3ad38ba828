"""What the environment tests share: a cache of built environments across runs, an empty
OPE_HOME per test under a torch policy, and the skip (or, under CI, failure) when
environments cannot be built here."""

import os
import platform
import urllib.request

import pytest
import torch

from ope import EnvError, envs
from ope.install_policy import load_policy

CACHE_HOME = os.environ.get("OPE_TEST_HOME") or os.path.expanduser("~/.cache/ope-tests")
HOST_MINOR = ".".join(platform.python_version_tuple()[:2])
OTHER_PYTHON = "3.10"


@pytest.fixture(scope="session")
def torch_policy(tmp_path_factory):
    """Constraints that keep torch, in every environment these tests build, to the host's own
    build on the host's Python and forbid it on any other: a registry torch brings gigabytes
    of CUDA libraries."""
    path = tmp_path_factory.mktemp("policy") / "constraints.txt"
    path.write_text(f'torch=={torch.__version__} ; python_version == "{HOST_MINOR}"\n'
                    f'torch<0 ; python_version != "{HOST_MINOR}"\n')
    return str(path)


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch, torch_policy):
    """Every test starts with an empty OPE_HOME of its own, never the user's, under the
    torch policy."""
    monkeypatch.setenv(envs.HOME_ENV, str(tmp_path / "ope-home"))
    monkeypatch.setenv("OPE_CONSTRAINTS", torch_policy)


def skip_unless_buildable():
    """Skip (fail in CI) with the reason when environments cannot be built here."""
    reasons = []
    try:
        envs.find_python(OTHER_PYTHON)
    except EnvError as exc:
        reasons.append(str(exc))
    index = load_policy().index_url or "https://pypi.org/simple/"
    try:
        urllib.request.urlopen(index.rstrip("/") + "/pip/", timeout=10).close()
    except OSError as exc:
        reasons.append(f"package registry {index} unreachable ({exc})")
    if reasons:
        reason = "cannot build worker environments: " + "; ".join(reasons)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
