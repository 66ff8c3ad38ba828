"""The Keras 3 runner: a model saved with ``model.save("model.keras")``, loaded by
``keras.saving.load_model`` under the backend its package records.

Keras picks its backend once, when it is first imported, from ``KERAS_BACKEND``: the runner
sets that variable before importing keras, so a worker runs the model on the package's
backend. A process whose keras is already imported on another backend cannot switch, and
loading the package there is a RequirementError that says so.
"""

import contextlib
import functools
import os
import sys

from ope.errors import PackageError, RequirementError
from ope.runners.base import Runner, model_error_of
from ope.runners.outputs import bind_outputs
from ope.runners.torch_tensors import tensors_to_numpy

__all__ = ["KerasRunner", "BACKENDS", "BACKEND_ENV"]

# backend -> the distribution the backend's framework comes from
BACKENDS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}
BACKEND_ENV = "KERAS_BACKEND"


class KerasRunner(Runner):
    """Calls the model with its inputs by name (a dict for models built on a dict of
    ``keras.Input``, a list in the model's input order for a list, the array for one input),
    in inference mode; what it returns is bound by ope/runners/outputs.py and turned into
    numpy arrays."""

    framework = "keras"

    def __init__(self, package, *options):
        super().__init__(package, *options)
        self.backend = package.config["backend"]
        self._keras = keras = import_keras(package, self.backend)
        # Keras places variables and inputs by a per-thread scope, else on a GPU if it sees one.
        self._placed = functools.partial(keras.device, _keras_device(self.device))
        try:
            with self._placed():
                self._model = keras.saving.load_model(package.model_file, compile=False)
        except Exception as error:
            raise PackageError(f"package {package.name!r}: cannot load Keras model "
                               f"{package.model_file}: {type(error).__name__}: {error}") from None
        self._arrange = _arranger(package, self._model)
        # On torch, no autograd graph is built, and tensors come back as numpy views.
        torch = sys.modules["torch"] if self.backend == "torch" else None
        self._no_grad = torch.no_grad if torch else contextlib.nullcontext
        self._to_numpy = (functools.partial(tensors_to_numpy, torch) if torch else
                          functools.partial(_converted, keras.ops.convert_to_numpy))

    def run(self, inputs):
        try:
            with self._placed(), self._no_grad():
                result = self._model(self._arrange(inputs), training=False)
        except Exception as error:
            raise model_error_of(self.package, error, "while running") from None
        return self._to_numpy(bind_outputs(self.package, result))

    def describe(self):
        return {**super().describe(), "keras_backend": self._keras.backend.backend()}


def import_keras(package, backend):
    """keras, imported on ``backend``; RequirementError if this process already runs keras on
    another one, PackageError if keras is not installed."""
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ[BACKEND_ENV] = backend
        try:
            import keras
        except ImportError as error:
            raise PackageError(f"package {package.name!r} needs keras on the {backend!r} "
                               f"backend, which cannot be imported here ({error})") from None
    running = keras.backend.backend()
    if running != backend:
        raise RequirementError(
            f"package {package.name!r} runs on the Keras backend {backend!r}, but this process "
            f"already imported keras with backend {running!r}, and keras cannot switch "
            f"backends once imported: load it out of process (its worker sets "
            f"{BACKEND_ENV}={backend})")
    return keras


def _keras_device(device):
    """Keras's name for ``device`` ("cpu" or "cuda:N"; None: the CPU)."""
    return "cpu" if device in (None, "cpu") else device.replace("cuda", "gpu")


def _converted(convert, outputs):
    return {name: convert(value) for name, value in outputs.items()}


def _arranger(package, model):
    """A function from the call's dict of arrays to what the model takes: a dict for a model
    built on a dict of inputs (and for a subclassed model, which has no input structure), a
    list in the model's order for a list, the array for a single input."""
    tensors = getattr(model, "inputs", None)
    if not tensors:
        return lambda inputs: inputs
    structure = getattr(model, "input", None)  # a Sequential model has none until called
    names = list(structure) if isinstance(structure, dict) else [t.name for t in tensors]
    expected = [spec.name for spec in package.inputs]
    if sorted(names) != sorted(expected):
        raise PackageError(f"package {package.name!r}: the model's inputs are "
                           f"{', '.join(names)}; the package's are {', '.join(expected)}")
    if isinstance(structure, dict):
        return lambda inputs: inputs
    if isinstance(structure, (list, tuple)):
        return lambda inputs: [inputs[name] for name in names]
    return lambda inputs: inputs[names[0]]
