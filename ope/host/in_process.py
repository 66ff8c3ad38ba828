"""The in-process mode: the model runs in the caller's thread, through the same runner a
worker would use, on read-only views of the caller's arrays."""

import os
import platform

import numpy as np

from ope.host.model import Model
from ope.runners import load_runner

__all__ = ["InProcessModel"]


class InProcessModel(Model):
    """Runs the model in this process, through the same runner a worker would use."""

    def __init__(self, package, device=None):
        super().__init__(package)
        self._runner = load_runner(package, device=device)

    def _run(self, arrays, bindings, timeout_s):
        # A running model in this thread cannot be interrupted: timeouts apply out of process.
        # Read-only views, as a worker gets: a model that writes into its inputs fails the
        # same way in both modes, and never changes the caller's arrays.
        return self._runner.run({name: _read_only(array) for name, array in arrays.items()})

    def empty(self, name, shape):
        return np.empty(tuple(shape), self._empty_spec(name, shape).numpy_dtype)

    def seal(self, array):
        array.flags.writeable = False
        return array

    def _close(self):
        if self._runner is not None:
            self._runner.close()
        self._runner = None

    def stats(self):
        stats = super().stats()
        stats["pid"] = os.getpid()
        # The same keys a worker reports about its runner (workers/worker.py), for this process.
        stats["worker"] = {"pid": os.getpid(), "python": platform.python_version(),
                           **self._runner.describe()} if self._runner else {}
        return stats

    def health(self):
        health = super().health()
        health["mode"] = "in_process"
        return health


def _read_only(array):
    view = array.view()
    view.flags.writeable = False
    return view
