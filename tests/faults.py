"""A model package that misbehaves on request, for fault-injection tests.

Input ``fault`` (int32, shape ()) picks what the call does; ``x`` (float32, ("n",)) is echoed
plus one when nothing goes wrong. The package's data dir holds ``faults.json`` with faults at
load time and "crash on the Nth call". A worker started with :data:`SLOW_RELOAD_ENV` naming a
marker file loads at once the first time (and leaves the marker), and takes
:data:`SLOW_RELOAD_S` seconds to load each time after: a restart that is slow on purpose.
"""

import json
import os

from ope import TensorSpec

import models

__all__ = ["FAULTS", "fault_package", "fault_inputs", "SLOW_RELOAD_ENV", "SLOW_RELOAD_S"]

# "balloon_to": grows by 4 MiB every 10 ms up to x[0] MiB, then sleeps.
FAULTS = {"ok": 0, "segfault": 1, "exit3": 2, "sigkill": 3, "spin": 4, "sleep": 5,
          "balloon": 6, "garbage": 7, "raise": 8, "ignore_sigterm_spin": 9, "balloon_to": 10}

SLOW_RELOAD_ENV = "OPE_FAULTS_SLOW_RELOAD"
SLOW_RELOAD_S = 4.0

_SOURCE = '''
import ctypes, json, os, signal, sys, time
import numpy as np


def _corrupt_channel():
    """Scribble over the worker-to-host queue, as a buggy native extension might."""
    prefix = sys.argv[sys.argv.index("--arena") + 1]
    fd = os.open(f"/dev/shm/{prefix}-0", os.O_RDWR)
    try:
        header = os.pread(fd, 64, 0)
        w2h_queue = int.from_bytes(header[32:40], "little")
        os.pwrite(fd, os.urandom(256), w2h_queue + 384)       # the records
        os.pwrite(fd, (2**40 + 12345).to_bytes(8, "little"), w2h_queue + 64)  # head
    finally:
        os.close(fd)


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
        elif fault == 10:
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
