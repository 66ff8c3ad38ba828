"""Fixtures shared by the behavioural suite.

``mode`` parametrises every test that loads a model; adding "out_of_process" to MODES runs
the same tests through the other execution mode. ``load_model`` loads in that mode and
closes at teardown. An autouse check fails any test that leaves a child process, a thread or a
file descriptor (an arena segment among them) behind.
"""

import os
import threading
import time

import psutil
import pytest

import ope
import ope.bridge.arena
import ope.bridge.protocol

import models  # tests/ is on sys.path: pytest puts a rootless conftest's folder there
from fault_package import fault_package

MODES = ["in_process", "out_of_process"]


def attach_worker(host, first_id=2, max_bytes=4 << 20):
    """A worker-side arena attached to the host arena ``host`` in this process, as a worker
    process attaches to the descriptors it inherits (ope/bridge/arena.py)."""
    spec, _ = host.connect()
    return ope.bridge.arena.Arena.attach(spec, first_id=first_id, max_bytes=max_bytes)


# Every dtype code a frame may carry, the string code among them, and the itemsize a code has.
CODES = list(range(len(ope.spec.DTYPES)))
STRING = ope.bridge.protocol.STRING_CODE


def itemsize_of(code, width=1):
    """The itemsize of dtype ``code``; a string's is 4 bytes per character of ``width``."""
    return 4 * width if code == STRING else ope.bridge.protocol.DTYPES_BY_CODE[code].itemsize


def describe(name, array, seg_id, payload):
    """The frame descriptor (ope/bridge/protocol.py) of ``array``, whose bytes lie at ``payload`` in
    segment ``seg_id``: what tests expect a frame to say, and how they write frames by hand."""
    return (name, ope.bridge.protocol.dtype_code(array.dtype), array.itemsize, array.shape, seg_id,
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


# ope's host-wide threads, which live as long as the host once started.
HOST_THREADS = {"ope-supervisor", "ope-output"}


@pytest.fixture(scope="session", autouse=True)
def host_wide_resources(tmp_path_factory):
    """Start what ope keeps for a host's whole life (the supervisor and output reader threads,
    the pipe to workers' watchdogs) before the first test, so that no test counts them as its
    leak: one model loaded out of process and closed does."""
    root = str(tmp_path_factory.mktemp("host-wide"))
    with ope.load(models.placeholder_package(root).path, out_of_process=True):
        pass


@pytest.fixture(autouse=True)
def no_leaks():
    children_before = set(psutil.Process().children(recursive=True))
    threads_before, fds_before = set(threading.enumerate()), _open_fds()
    yield
    children = set(psutil.Process().children(recursive=True)) - children_before
    assert not children, f"child processes left behind: {children}"
    threads, fds = _new_threads_and_fds_still_there(threads_before, fds_before)
    assert not threads, f"threads left behind: {sorted(t.name for t in threads)}"
    assert not fds, f"file descriptors left open: {fds}"  # arena segments among them


def _open_fds():
    """This process's descriptors, with what each refers to."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor, or one closed meanwhile
            pass
    return fds


def _new_threads_and_fds_still_there(threads_before, fds_before, grace_s=2.0):
    """New threads (other than ope's host-wide ones) still running and new descriptors still
    open after a grace for those ending now (a collector thread seeing its model closed)."""
    deadline = time.monotonic() + grace_s
    while True:
        threads = {t for t in threading.enumerate()
                   if t not in threads_before and t.name not in HOST_THREADS}
        fds = {fd: target for fd, target in _open_fds().items()
               if fds_before.get(fd) != target}
        if not (threads or fds) or time.monotonic() >= deadline:
            return threads, fds
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def no_names_in_dev_shm():
    """ope's segments are memfds: a run of the suite never makes a name in /dev/shm (other
    runs on the machine may, hence only names of this host process)."""
    before = set(os.listdir("/dev/shm"))
    yield
    made = {name for name in set(os.listdir("/dev/shm")) - before
            if name.startswith(f"ope-{os.getpid()}-")}
    assert not made, f"names made in /dev/shm: {sorted(made)}"


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


# -- the fault tests (tests/faults/) --------------------------------------------------------
# Fault injection with real processes and real signals: every fault the supervisor claims to
# handle surfaces as its typed error, the host and other models go on, and nothing leaks. Their
# time bounds carry slack for a loaded CI machine (fault_package.SLACK_S);
# bench/bench_faults.py measures the real detection latencies.

@pytest.fixture(scope="session")
def faulty(package_root):
    return fault_package(str(package_root))


@pytest.fixture
def open_model(faulty):
    """Open a model of the fault package (or of ``path``) out of process; closed at teardown."""
    opened = []

    def open_(path=faulty, **options):
        options.setdefault("timeout_s", 10.0)
        options.setdefault("stop_grace_s", 0.5)
        model = ope.load(path, out_of_process=True, **options)
        opened.append(model)
        return model

    yield open_
    for model in opened:
        model.close()
