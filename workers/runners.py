"""Runners: the code that executes one kind of model, the same in both modes.

:func:`load_runner` builds a runner once per loaded model; ``runner.run(inputs)`` is then
called with a dict of numpy arrays that already passed ``spec.validate_inputs`` and returns
the model's outputs by name. Torch tensors in the result are turned into numpy views; the
caller passes the result through ``spec.validate_outputs``, which checks it and normalises
what is left (e.g. lists of str).

This module is imported inside worker processes, so it depends only on numpy and on
ope.errors / ope.spec / ope.package, never on host-side modules; torch is imported only by
the runners that need it. The arrays a runner receives are read-only views: on the caller's
arrays in process, on the worker's copy-on-write mapping of the host's memory out of process.

A model never changes the caller's data. numpy refuses writes to a read-only view; torch
ignores the flag, so a torch runner hands its model tensors over the worker's copy-on-write
memory, where a write reaches only the worker's own pages, and in process over copies. Either
way an in-place op on an input (``x.mul_(2)``) bumps the tensor's version counter, and the call
fails with InputWriteError naming the input, the same in both modes.
"""

import contextlib
import importlib
import os
import sys
import warnings

import numpy as np

from ope.errors import InputWriteError, PackageError, model_error

__all__ = ["Runner", "load_runner"]


class Runner:
    """Executes one loaded model: ``run(inputs) -> outputs``, both dicts keyed by name."""

    def __init__(self, package, private_inputs=False):
        self.package = package
        self.private_inputs = private_inputs

    def run(self, inputs):
        raise NotImplementedError


def load_runner(package, private_inputs=False):
    """The runner for ``package``. PackageError if its artefact or entrypoint is unusable,
    ModelError if the model's own code raised while loading. ``private_inputs``: the arrays
    ``run`` gets lie in memory whose writes stay in this process (a worker's copy-on-write
    view, ope/bridge/arena.py), so a model may be handed them as they are."""
    return _RUNNERS[package.runner](package, private_inputs)


def _model_error(package, error, while_doing):
    """ModelError for an exception raised by the model's code; the traceback starts at the
    model's frame, not ours."""
    frames = error.__traceback__.tb_next if error.__traceback__ else None
    return model_error(error, f"model {package.name!r} raised {type(error).__name__} "
                              f"{while_doing}", frames)


def _call_model(package, model, inputs):
    try:
        return model(**inputs)
    except Exception as error:
        raise _model_error(package, error, "while running") from None


# --- torch helpers ------------------------------------------------------------------------

def _import_torch(package, private_inputs):
    try:
        import torch
    except ImportError:
        raise PackageError(f"package {package.name!r} needs torch, which is not "
                           f"installed") from None
    if private_inputs:
        # Torch warns that it cannot make a tensor over a read-only array read-only; over
        # private memory that is expected. Filtered once, in the worker only: a filter set
        # around every call would cost microseconds per call.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
    return torch


def _to_tensor(torch, array, private):
    """A tensor for the model over ``array``'s memory if writes to it are ``private``, else over
    a copy."""
    if not private:
        return torch.from_numpy(np.array(array))
    try:
        return torch.from_numpy(array)
    except ValueError:  # negative strides: torch cannot view them, so this one array is copied
        return torch.from_numpy(np.ascontiguousarray(array))


def _check_inputs_untouched(package, arguments, torch):
    """InputWriteError naming the inputs the model wrote into: every in-place op bumps a
    tensor's version counter, which starts at 0 for the tensors made for the call."""
    written = [name for name, value in arguments.items()
               if isinstance(value, torch.Tensor) and value._version]
    if written:
        raise InputWriteError(
            f"model {package.name!r} wrote into its input{'s' * (len(written) > 1)} "
            f"{', '.join(map(repr, written))} in place: inputs are read-only, so the caller's "
            f"data is unchanged (copy an input before changing it, e.g. x.clone())",
            error_type="InputWriteError")


def _tensors_to_numpy(torch, outputs):
    if not isinstance(outputs, dict):
        return outputs  # validate_outputs reports what the model returned instead
    return {name: _tensor_to_numpy(torch, value) for name, value in outputs.items()}


def _tensor_to_numpy(torch, value):
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if value.device.type != "cpu":
        value = value.cpu()
    try:
        return value.numpy()
    except (TypeError, RuntimeError):
        return value  # e.g. bfloat16: validate_outputs names the output and its dtype


# --- the runners --------------------------------------------------------------------------

class _TorchScriptRunner(Runner):
    """Calls ``forward`` with one keyword argument per input, under inference mode. Results:
    a dict (by name), a tuple (in output spec order) or anything else (the only output)."""

    def __init__(self, package, private_inputs=False):
        super().__init__(package, private_inputs)
        self._torch = torch = _import_torch(package, private_inputs)
        try:
            self._module = torch.jit.load(package.model_file, map_location="cpu").eval()
        except Exception as error:
            raise PackageError(f"package {package.name!r}: cannot load TorchScript file "
                               f"{package.model_file}: {error}") from None
        self._check_signature()
        self._output_names = tuple(spec.name for spec in package.outputs)
        self._string_inputs = frozenset(s.name for s in package.inputs if s.dtype == "string")

    def _check_signature(self):
        parameters = [arg.name for arg in self._module.forward.schema.arguments[1:]]
        expected = sorted(spec.name for spec in self.package.inputs)
        if sorted(parameters) != expected:
            raise PackageError(f"package {self.package.name!r}: forward({', '.join(parameters)}) "
                               f"does not take exactly the inputs {', '.join(expected)}")

    def run(self, inputs):
        torch = self._torch
        # TorchScript takes strings as List[str], not arrays.
        arguments = {name: array.tolist() if name in self._string_inputs
                     else _to_tensor(torch, array, self.private_inputs)
                     for name, array in inputs.items()}
        with torch.inference_mode():
            result = _call_model(self.package, self._module, arguments)
        _check_inputs_untouched(self.package, arguments, torch)
        return _tensors_to_numpy(torch, self._by_name(result))

    def _by_name(self, result):
        if isinstance(result, dict):
            return result
        if isinstance(result, tuple):
            if len(result) != len(self._output_names):
                return result  # validate_outputs: "returned tuple, expected a dict of ..."
            return dict(zip(self._output_names, result))
        if len(self._output_names) == 1:
            return {self._output_names[0]: result}
        return result


class _PythonRunner(Runner):
    """Imports the entrypoint from the package's code, calls ``factory(data_dir)`` once,
    then calls the returned model with one keyword argument per input."""

    def __init__(self, package, private_inputs=False):
        super().__init__(package, private_inputs)
        self._torch = _import_torch(package, private_inputs) if package.framework == "torch" \
            else None
        self._model = self._load_model()

    def _load_model(self):
        package = self.package
        module_name, _, factory_name = package.entrypoint.partition(":")
        with _private_imports(package.code_dir, package.code_modules):
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                if error.name and module_name.startswith(error.name):
                    raise PackageError(f"package {package.name!r}: entrypoint module "
                                       f"{module_name!r} not found in its code") from None
                raise _model_error(package, error, "while importing its code") from None
            except Exception as error:
                raise _model_error(package, error, "while importing its code") from None
        _check_origin(package, module)
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise PackageError(f"package {package.name!r}: entrypoint {package.entrypoint!r} "
                               f"is not a callable in {module_name}")
        try:
            model = factory(package.data_dir)
        except Exception as error:
            raise _model_error(package, error, "in its factory") from None
        if not callable(model):
            raise PackageError(f"package {package.name!r}: factory returned "
                               f"{type(model).__name__}, expected a callable model")
        return model

    def run(self, inputs):
        torch = self._torch
        if torch is None:
            return _call_model(self.package, self._model, inputs)
        arguments = {name: array if array.dtype.kind == "U"
                     else _to_tensor(torch, array, self.private_inputs)
                     for name, array in inputs.items()}
        with torch.inference_mode():
            result = _call_model(self.package, self._model, arguments)
        _check_inputs_untouched(self.package, arguments, torch)
        return _tensors_to_numpy(torch, result)


def _check_origin(package, module):
    """PackageError unless ``module`` was loaded from a file in the package's code/. Reading
    the package checked that its entrypoint names a module there; this catches any way the
    import still took another (a builtin or frozen module comes before code/, a module may
    replace itself in sys.modules)."""
    origin = getattr(module, "__file__", None)
    code_dir = os.path.join(os.path.realpath(package.code_dir), "")
    if not isinstance(origin, str) or not os.path.realpath(origin).startswith(code_dir):
        raise PackageError(f"package {package.name!r}: entrypoint {package.entrypoint!r}: "
                           f"module {module.__name__!r} was imported from "
                           f"{origin or 'no file'}, not from the package's code/")


class _PlaceholderRunner(Runner):
    """Random outputs of the spec'd dtypes; symbols take their sizes from the inputs, other
    free dims are 1."""

    def __init__(self, package, private_inputs=False):
        super().__init__(package, private_inputs)
        self._random = np.random.default_rng()

    def run(self, inputs):
        sizes = {}
        for spec in self.package.inputs:
            for index, dim in enumerate(spec.shape):
                if isinstance(dim, str):
                    sizes.setdefault(dim, inputs[spec.name].shape[index])
        return {spec.name: self._random_array(spec, sizes) for spec in self.package.outputs}

    def _random_array(self, spec, sizes):
        shape = tuple(dim if isinstance(dim, int) else sizes.get(dim, 1) for dim in spec.shape)
        dtype = spec.numpy_dtype
        if spec.dtype == "string":
            return np.full(shape, "placeholder")
        if dtype.kind == "f":
            return self._random.standard_normal(shape).astype(dtype)
        if dtype.kind == "b":
            return self._random.integers(0, 2, shape).astype(bool)
        return self._random.integers(0, 100, shape, dtype=dtype)


_RUNNERS = {"torchscript": _TorchScriptRunner, "python": _PythonRunner,
            "placeholder": _PlaceholderRunner}


@contextlib.contextmanager
def _private_imports(code_dir, top_level):
    """Import from ``code_dir``, whose top-level modules are named ``top_level``, without
    seeing, or leaking into, this process's modules.

    Two packages loaded in one process may both ship a top-level module named ``model``;
    neither may get the other's. For the import, the package's top-level names leave
    ``sys.modules`` and ``code_dir`` goes first on ``sys.path``; afterwards the modules
    imported from it are dropped again (the model holds its own references, so model code
    must import its modules at import time, not lazily) and the originals come back.
    No bytecode is written: the package folder must stay exactly as its manifest says.
    """
    def own(module_name):
        return module_name.partition(".")[0] in top_level

    shadowed = {name: sys.modules.pop(name) for name in list(sys.modules) if own(name)}
    write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    sys.path.insert(0, code_dir)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(code_dir)
        sys.dont_write_bytecode = write_bytecode
        for name in [name for name in sys.modules if own(name)]:
            del sys.modules[name]
        sys.modules.update(shadowed)
