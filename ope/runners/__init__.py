"""Runners: the code that executes one kind of model, the same in both modes.

:func:`load_runner` builds a runner once per loaded model; ``runner.run(inputs)`` is then
called with a dict of numpy arrays that already passed ``spec.validate_inputs`` and returns
the model's outputs by name, bound by ope/runners/outputs.py's rule (named tuples and dicts by
name, plain sequences in spec order). Torch tensors in the result are turned into numpy views; the
caller passes the result through ``spec.validate_outputs``, which checks it and normalises
what is left (e.g. lists of str).

One module per kind of model (torchscript.py, torch_export.py, torch_package.py, python.py,
placeholder.py, onnx.py, keras.py, tensorflow.py; torch_runner.py and torch_tensors.py hold
what the torch runners share), found by the package's ``runner`` in the registry
below. These modules are imported inside worker processes, so they depend only on numpy and
ope's base modules (errors, devices), never on host-side modules; torch is imported only by the runners that need
it. The arrays a runner receives are read-only views: on the caller's arrays in process, on
the worker's copy-on-write mapping of the host's memory out of process.

A model never changes the caller's data. numpy refuses writes to a read-only view; torch
ignores the flag, so a torch runner hands its model tensors over the worker's copy-on-write
memory, where a write reaches only the worker's own pages, and in process over copies. Either
way an in-place op on an input (``x.mul_(2)``) bumps the tensor's version counter, and the call
fails with InputWriteError naming the input, the same in both modes.
"""

from ope.runners.base import Runner
from ope.runners.onnx import OnnxRunner
from ope.runners.keras import KerasRunner
from ope.runners.placeholder import PlaceholderRunner
from ope.runners.python import PythonRunner
from ope.runners.tensorflow import TensorFlowRunner
from ope.runners.torch_export import TorchExportRunner
from ope.runners.torch_package import TorchPackageRunner
from ope.runners.torchscript import TorchScriptRunner

__all__ = ["Runner", "load_runner", "RUNNER_CLASSES"]

# The registry: a package's "runner" names its class here.
RUNNER_CLASSES = {"torchscript": TorchScriptRunner, "python": PythonRunner,
                  "placeholder": PlaceholderRunner, "torch_export": TorchExportRunner,
                  "torch_package": TorchPackageRunner, "onnx": OnnxRunner, "keras": KerasRunner,
                  "tensorflow": TensorFlowRunner}


def load_runner(package, private_inputs=False, threads=None, device=None):
    """The runner for ``package``. PackageError if its artefact or entrypoint is unusable,
    ModelError if the model's own code raised while loading. ``private_inputs``: the arrays
    ``run`` gets lie in memory whose writes stay in this process (a worker's copy-on-write
    view, ope/bridge/arena.py), so a model may be handed them as they are. ``threads`` and
    ``device``: see :class:`~ope.runners.base.Runner`."""
    return RUNNER_CLASSES[package.runner](package, private_inputs, threads, device)
