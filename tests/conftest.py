"""Fixtures shared by the behavioural suite.

``mode`` parametrises every test that loads a model; adding "out_of_process" to MODES runs
the same tests through the other execution mode. ``load_model`` loads in that mode and
closes at teardown. An autouse check fails any test that leaves a shared-memory segment
(``/dev/shm/ope-*``) or a child process behind.
"""

import os
import time

import psutil
import pytest

import ope
import ope.host

import models  # tests/ is on sys.path: pytest puts a rootless conftest's folder there

MODES = ["in_process", "out_of_process"]


def attach_worker(host, first_id=2, max_bytes=4 << 20):
    """A worker-side arena attached to the host arena ``host`` in this process, as a worker
    process attaches to the descriptors it inherits (ope/arena.py)."""
    spec, _ = host.connect()
    return ope.arena.Arena.attach(spec, first_id=first_id, max_bytes=max_bytes)


def describe(name, array, seg_id, payload):
    """The frame descriptor (ope/protocol.py) of ``array``, whose bytes lie at ``payload`` in
    segment ``seg_id``: what tests expect a frame to say, and how they write frames by hand."""
    return (name, ope.protocol.dtype_code(array.dtype), array.itemsize, array.shape, seg_id,
            payload, array.nbytes)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def load_model(mode):
    loaded = []

    def load(path, **options):
        model = ope.load(path, out_of_process=(mode == "out_of_process"), **options)
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.close()


@pytest.fixture(autouse=True)
def no_leaks():
    segments_before = _ope_segments()
    children_before = set(psutil.Process().children(recursive=True))
    yield
    leaked = _new_segments_still_there(segments_before)
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"
    children = set(psutil.Process().children(recursive=True)) - children_before
    assert not children, f"child processes left behind: {children}"


def _ope_segments():
    """ope- segments this test run could have left: those of this process, less those of
    models still open (module-scoped fixtures), and those whose owner is dead (a host process
    a test started and killed). Live owners elsewhere are other runs on this machine."""
    mine = f"ope-{os.getpid()}-"
    return {name for name in os.listdir("/dev/shm")
            if name.startswith("ope-") and (name.startswith(mine) or not _owner_alive(name))}


def _owner_alive(name):
    try:
        return psutil.pid_exists(int(name.split("-")[1]))
    except (IndexError, ValueError):
        return False


@pytest.fixture(scope="session", autouse=True)
def nothing_left_at_the_end():
    before = {name for name in os.listdir("/dev/shm") if name.startswith(f"ope-{os.getpid()}-")}
    yield
    left = {name for name in os.listdir("/dev/shm") if name.startswith(f"ope-{os.getpid()}-")}
    assert left <= before, f"segments of this test run left in /dev/shm: {sorted(left - before)}"


def _new_segments_still_there(before, grace_s=2.0):
    """New ope- segments that persist. /dev/shm is machine-wide: a segment another ope
    process (a second test run) holds for a moment is not ours, so give it time to go."""
    deadline = time.monotonic() + grace_s
    leaked = _ope_segments() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked &= _ope_segments()
    return leaked


# Packages are immutable once built, so one build serves the whole session.

@pytest.fixture(scope="session")
def package_root(tmp_path_factory):
    return tmp_path_factory.mktemp("packages")


@pytest.fixture(scope="session")
def affine(package_root):
    return models.affine_package(str(package_root))


@pytest.fixture(scope="session")
def gated(package_root):
    return models.torchscript_package(str(package_root))


@pytest.fixture(scope="session")
def eager(package_root):
    return models.eager_torch_package(str(package_root))


@pytest.fixture(scope="session")
def placeholder(package_root):
    return models.placeholder_package(str(package_root))


@pytest.fixture(scope="session")
def probe(package_root):
    return models.probe_package(str(package_root))


@pytest.fixture(scope="session")
def unruly(package_root):
    return models.unruly_package(str(package_root))
