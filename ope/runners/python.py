"""The python runner: a factory imported from the package's own code/ (and nothing else),
called once with its data folder; the model it returns is called with one keyword argument
per input, with numpy arrays or, for framework "torch", tensors (and, for a numpy model that
takes ``out``, the arrays to write its outputs into: ope/runners/out_arrays.py). What it
returns is bound to the output names by ope/runners/outputs.py."""

import contextlib
import importlib
import os
import sys

from ope.errors import PackageError
from ope.runners.base import Runner, call_model, model_error_of
from ope.runners.out_arrays import out_arrays_for
from ope.runners.outputs import bind_outputs
from ope.runners.torch_tensors import (check_inputs_untouched, import_torch, tensors_to_numpy,
                                       to_tensor, torch_device)

__all__ = ["PythonRunner"]


class PythonRunner(Runner):
    """Imports the entrypoint from the package's code, calls ``factory(data_dir)`` once,
    then calls the returned model with one keyword argument per input."""

    def __init__(self, package, *options):
        super().__init__(package, *options)
        self.framework = package.framework
        self._torch = self._device = None
        if package.framework == "torch":
            self._torch = import_torch(package, self.private_inputs, self.threads)
            self._device = torch_device(self._torch, self.device)
            self.device = str(self._device)
        self._model = self._load_model()
        # numpy models that take ``out`` write into arrays made per call (out_arrays.py)
        self._out = out_arrays_for(package, self._model) if self._torch is None else None
        if self._torch is not None and isinstance(self._model, self._torch.nn.Module):
            self._model.to(self._device)

    def describe(self):
        described = super().describe()
        if self._torch is not None:
            described["device"] = self.device
        return described

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
                raise model_error_of(package, error, "while importing its code") from None
            except Exception as error:
                raise model_error_of(package, error, "while importing its code") from None
        _check_origin(package, module)
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise PackageError(f"package {package.name!r}: entrypoint {package.entrypoint!r} "
                               f"is not a callable in {module_name}")
        try:
            model = factory(package.data_dir)
        except Exception as error:
            raise model_error_of(package, error, "in its factory") from None
        if not callable(model):
            raise PackageError(f"package {package.name!r}: factory returned "
                               f"{type(model).__name__}, expected a callable model")
        return model

    def run(self, inputs):
        torch = self._torch
        if torch is None and self._out is not None:
            out = self._out.make(inputs)
            result = call_model(self.package, self._model, {**inputs, "out": out})
            # This frame's references go when it returns: an output the model let go of is
            # then referenced by the bound dict alone (the worker sends it without a copy).
            return bind_outputs(self.package, out if result is None else result)
        if torch is None:
            return bind_outputs(self.package, call_model(self.package, self._model, inputs))
        arguments = {name: array if array.dtype.kind == "U"
                     else to_tensor(torch, array, self.private_inputs, self._device)
                     for name, array in inputs.items()}
        with torch.inference_mode():
            result = call_model(self.package, self._model, arguments)
        check_inputs_untouched(self.package, arguments, torch)
        return tensors_to_numpy(torch, bind_outputs(self.package, result))


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
