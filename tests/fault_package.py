"""A model package that misbehaves on request, for fault-injection tests.

Input ``fault`` (int32, shape ()) picks what the call does; ``x`` (float32, ("n",)) is echoed
plus one when nothing goes wrong. The package's data dir holds ``faults.json`` with faults at
load time and "crash on the Nth call". Some faults only leave something behind and then answer
as "ok" does: a helper process that never stops ("spawn" in the worker's process group,
"escape" in a session of its own, "fork" a bare fork), or 64 MiB of output without a newline
("flood"). A worker started with :data:`SLOW_RELOAD_ENV` naming a marker file loads at once
the first time (and leaves the marker), and takes :data:`SLOW_RELOAD_S` seconds to load each
time after: a restart that is slow on purpose.
"""

import json
import os
import time

import numpy as np

from ope import TensorSpec

import models

__all__ = ["FAULTS", "fault_package", "fault_inputs", "SLOW_RELOAD_ENV", "SLOW_RELOAD_S", "SLACK_S",
           "assert_works", "wait_for"]

# "balloon_to": grows by 4 MiB every 10 ms up to x[0] MiB, then sleeps.
FAULTS = {"ok": 0, "segfault": 1, "exit3": 2, "sigkill": 3, "spin": 4, "sleep": 5,
          "balloon": 6, "garbage": 7, "raise": 8, "ignore_sigterm_spin": 9, "spawn": 10,
          "escape": 11, "fork": 12, "flood": 13, "shared_balloon": 14, "memfd_balloon": 15,
          "garbage_everywhere": 16, "garbage_host_queue": 17, "shrink": 18, "balloon_to": 19}

SLOW_RELOAD_ENV = "OPE_FAULTS_SLOW_RELOAD"
SLOW_RELOAD_S = 4.0

_SOURCE = '''
import ctypes, json, mmap, os, signal, subprocess, sys, time
import numpy as np


def _arena_mappings():
    """(address, size) of every ope segment mapped in this worker (ope/bridge/arena.py)."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:ope-arena" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                found.append((start, end - start))
    return found


def _control_segment():
    """The control segment: the one whose header names queue offsets."""
    for address, size in _arena_mappings():
        if int.from_bytes(ctypes.string_at(address + 24, 8), "little"):
            return address, size
    raise RuntimeError("no control segment mapped")


def _scribble_everywhere():
    """Random bytes over every byte of every arena segment this worker maps."""
    for address, size in _arena_mappings():
        ctypes.memmove(address, os.urandom(size), size)


def _corrupt_host_queue():
    """Garbage in the header of the host-to-worker queue, which the host writes into."""
    address, _ = _control_segment()
    h2w_queue = int.from_bytes(ctypes.string_at(address + 24, 8), "little")
    ctypes.memmove(address + h2w_queue, os.urandom(384), 384)


def _shrink_segments():
    """Try to truncate every arena segment within reach, the host's own through /proc (a
    process of the same user may open another's descriptors there); every try must fail."""
    paths = [f"/proc/self/fd/{fd}" for fd in os.listdir("/proc/self/fd")]
    paths += [f"/proc/{os.getppid()}/fd/{fd}" for fd in os.listdir(f"/proc/{os.getppid()}/fd")]
    shrunk = []
    for path in paths:
        try:
            if "memfd:ope-arena" not in os.readlink(path):
                continue
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            os.ftruncate(fd, 0)
            shrunk.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    if shrunk:
        raise RuntimeError(f"truncated {shrunk}")


def _start_helper(how):
    """A process the model starts and never stops, as a data loader or a server might."""
    if how == "fork":
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
    else:
        subprocess.Popen(["sleep", "1000"], start_new_session=(how == "escape"))


def _flood():
    """64 MiB on stderr without a newline, as a progress bar redrawn with \\r writes it."""
    chunk = "#" * (1 << 20)
    for _ in range(64):
        sys.stderr.write(chunk)
    sys.stderr.write("\\nflood done\\n")
    sys.stderr.flush()


def _shared_balloon(memfd):
    """384 MiB of shared memory of the model's own (not the arena's), touched, then held."""
    size, step = 384 << 20, 1 << 20
    if memfd:
        fd = os.memfd_create("balloon")
        os.ftruncate(fd, size)
        area = mmap.mmap(fd, size)
    else:
        area = mmap.mmap(-1, size)
    ones = b"\\1" * step
    for offset in range(0, size, step):
        area[offset:offset + step] = ones
    time.sleep(60)


def _corrupt_channel():
    """Scribble over the worker-to-host queue, as a buggy native extension might."""
    address, _ = _control_segment()
    w2h_queue = int.from_bytes(ctypes.string_at(address + 32, 8), "little")
    ctypes.memmove(address + w2h_queue + 384, os.urandom(256), 256)  # the records
    ctypes.memmove(address + w2h_queue + 64, (2**40 + 12345).to_bytes(8, "little"), 8)  # head


def _maybe_slow_reload():
    marker = os.environ.get("%s")
    if not marker:
        return
    if os.path.exists(marker):
        time.sleep(%r)
    else:
        open(marker, "w").close()


def factory(data_dir):
    _maybe_slow_reload()
    with open(os.path.join(data_dir, "faults.json")) as f:
        config = json.load(f)
    if config.get("load") == "crash":
        os._exit(7)
    if config.get("load") == "raise":
        raise RuntimeError("cannot load: weights are corrupt")
    if config.get("load") == "hang":
        time.sleep(3600)
    if config.get("load") in ("spawn", "escape", "fork"):
        _start_helper(config["load"])
    if config.get("load") == "flood":
        _flood()
    calls = [0]
    balloon = []

    def run(fault, x):
        calls[0] += 1
        if calls[0] == config.get("crash_on_call"):
            os._exit(9)
        fault = int(fault)
        if fault == 1:
            ctypes.string_at(0)
        elif fault == 2:
            print("fault: exiting with code 3", file=sys.stderr, flush=True)
            os._exit(3)
        elif fault == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == 4:
            while True:
                pass
        elif fault == 5:
            print("fault: sleeping", file=sys.stderr, flush=True)
            time.sleep(float(x[0]))
        elif fault == 6:
            while True:
                balloon.append(np.ones(16 << 20, np.uint8))
                time.sleep(0.01)
        elif fault == 7:
            _corrupt_channel()
        elif fault == 8:
            raise ValueError("the model says no")
        elif fault == 9:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                pass
        elif fault in (10, 11, 12):
            _start_helper({10: "spawn", 11: "escape", 12: "fork"}[fault])
        elif fault == 13:
            _flood()
        elif fault in (14, 15):
            _shared_balloon(memfd=(fault == 15))
        elif fault == 16:
            _scribble_everywhere()
        elif fault == 17:
            _corrupt_host_queue()
        elif fault == 18:
            _shrink_segments()
        elif fault == 19:
            while len(balloon) * 4 < float(x[0]):
                balloon.append(np.ones(4 << 20, np.uint8))
                time.sleep(0.01)
            time.sleep(3600)
        return {"y": x + 1}
    return run
'''


def fault_package(root, name="faults", **config):
    """Build (once per name) the fault package; ``config`` goes to faults.json."""
    path = os.path.join(root, name)
    if os.path.exists(path):
        return path
    data_dir = os.path.join(root, f"{name}-data")
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, "faults.json"), "w") as f:
        json.dump(config, f)
    return models.numpy_package(
        root, _SOURCE % (SLOW_RELOAD_ENV, SLOW_RELOAD_S), name=name, module="faulty",
        data_dir=data_dir,
        inputs=[TensorSpec("fault", "int32", ()), TensorSpec("x", "float32", ("n",))],
        outputs=[TensorSpec("y", "float32", ("n",))]).path


def fault_inputs(fault="ok", x=(1.0, 2.0)):
    import numpy as np
    return {"fault": np.array(FAULTS[fault], np.int32), "x": np.array(x, np.float32)}


SLACK_S = 1.0  # of the fault tests' time bounds, for a loaded CI machine


def assert_works(model):
    """Assert that ``model``, of the fault package, serves a call correctly."""
    out = model.infer(fault_inputs("ok", x=(1.0, 2.0)))
    np.testing.assert_array_equal(out["y"], [2.0, 3.0])


def wait_for(predicate, timeout_s, poll_s=0.005):
    """Whether ``predicate()`` came true within the time (polling state other threads change)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True
