"""Builders of the torch packages: TorchScript modules, torch.export programs (optionally
compiled ahead of time with AOTInductor) and eager models in torch.package archives, staged,
checked and renamed into place by build.py's ``_build``.

A model file handed over by path is identified first (ope/package/sniff.py), so a file of
another format is refused naming what it is, then opened from that path, so a file torch
cannot read is refused naming the path the caller gave, never the staging folder's copy.
"""

import inspect
import os

from ope.errors import PackageError
from ope.package.build import Environment, _build, _copy_file, _with_requirement
from ope.package.format import MODEL_FILES
from ope.package.sniff import check_format
from ope.package.torch_program import positional_inputs
from ope.spec import as_specs

__all__ = ["package_torchscript", "package_torch_export", "package_torch_package"]


def package_torchscript(path, module, *, name, inputs, outputs, requires=None, python=None,
                        lock="auto", test_inputs=None, test_outputs=None, self_check,
                        lock_requirements):
    """Package a TorchScript module (a ``torch.jit.script``/``trace`` result or the path of a
    file saved with ``torch.jit.save``). Inputs bind to ``forward``'s parameter names.
    The finished package is always loaded once (this checks ``forward``'s signature) and,
    given test data, self-checked by ``self_check`` (build.py's docstring). Returns the
    :class:`Package`."""
    torch = _import_torch("a TorchScript module")
    source = module if isinstance(module, (str, os.PathLike)) else None
    if source is not None:
        check_format(source, {"torchscript"}, "package_torchscript")
        module = _open(source, "a TorchScript file", torch.jit.load)
    if not isinstance(module, torch.jit.ScriptModule):
        raise PackageError(f"expected a TorchScript module (torch.jit.script or trace), got "
                           f"{type(module).__name__}")

    def write_artefacts(staging):
        target = os.path.join(staging, MODEL_FILES["torchscript"])
        if source is not None:
            _copy_file(source, target)
        else:
            torch.jit.save(module, target)
        return {"model_file": MODEL_FILES["torchscript"]}

    return _build(path, "torchscript", write_artefacts, name=name, inputs=inputs,
                  outputs=outputs, requires=_with_requirement(requires, "torch"),
                  test_inputs=test_inputs, test_outputs=test_outputs, load_check=True,
                  self_check=self_check, environment=Environment(python, lock, lock_requirements))


def package_torch_export(path, program, *, name, inputs, outputs, requires=None, python=None,
                         lock="auto", test_inputs=None, test_outputs=None, aot=False, self_check,
                         lock_requirements):
    """Package a ``torch.export.ExportedProgram`` (or the path of a ``.pt2`` saved with
    ``torch.export.save``). Inputs bind by the program's argument names, which must be the
    input specs' names; a dim the spec lets vary must be dynamic in the program
    (``torch.export.Dim``). ``aot=True`` compiles it with AOTInductor into the package (needs
    a C++ compiler at packaging; the package then runs without the model's Python, on the
    device type it was compiled for). Loaded once and, given test data, self-checked."""
    torch = _import_torch("a torch.export program")
    if isinstance(program, (str, os.PathLike)):
        check_format(program, {"torch_export"}, "package_torch_export")
        program = _open(program, "a torch.export program", torch.export.load)
    if not isinstance(program, torch.export.ExportedProgram):
        raise PackageError(f"expected a torch.export.ExportedProgram (torch.export.export) or "
                           f"the path of one saved with torch.export.save, got "
                           f"{type(program).__name__}")
    positional = positional_inputs(program, as_specs(inputs, "input"))

    def write_artefacts(staging):
        target = os.path.join(staging, MODEL_FILES["torch_export"])
        config = {"model_file": MODEL_FILES["torch_export"], "positional_inputs": positional,
                  "aot": bool(aot)}
        if aot:
            _compile_aot(torch, program, target)
            config["aot_device"] = _device_type(program)
        else:
            torch.export.save(program, target)
        return config

    return _build(path, "torch_export", write_artefacts, name=name, inputs=inputs,
                  outputs=outputs, requires=_with_requirement(requires, "torch"),
                  test_inputs=test_inputs, test_outputs=test_outputs, load_check=True,
                  self_check=self_check, environment=Environment(python, lock, lock_requirements))


def package_torch_package(path, archive, package_name, resource, *, name, inputs, outputs,
                          requires=None, python=None, lock="auto", test_inputs=None,
                          test_outputs=None, self_check, lock_requirements):
    """Package an eager model pickled in a torch.package archive (``archive``: the path of a
    file written by ``torch.package.PackageExporter``), loaded with
    ``PackageImporter(archive).load_pickle(package_name, resource)`` and called with one
    keyword argument per input. Loaded once and, given test data, self-checked."""
    torch = _import_torch("a torch.package archive")
    check_format(archive, {"torch_package"}, "package_torch_package")
    importer = _open(archive, "a torch.package archive", torch.package.PackageImporter)
    try:
        model = _open(archive, f"a torch.package archive holding {package_name}/{resource}",
                      lambda _: importer.load_pickle(package_name, resource))
        _check_callable_with(torch, model, [spec.name for spec in as_specs(inputs, "input")],
                             f"{archive}: {package_name}/{resource}")
    finally:
        importer.zip_reader = None  # closes the archive now, not when a collection finds it

    def write_artefacts(staging):
        _copy_file(archive, os.path.join(staging, MODEL_FILES["torch_package"]))
        return {"model_file": MODEL_FILES["torch_package"], "package_name": package_name,
                "resource": resource}

    return _build(path, "torch_package", write_artefacts, name=name, inputs=inputs,
                  outputs=outputs, requires=_with_requirement(requires, "torch"),
                  test_inputs=test_inputs, test_outputs=test_outputs, load_check=True,
                  self_check=self_check, environment=Environment(python, lock, lock_requirements))


def _import_torch(what):
    try:
        import torch
    except ImportError:
        raise PackageError(f"packaging {what} needs torch installed") from None
    return torch


def _open(path, what, load):
    """``load(path)``; PackageError naming ``path`` if torch cannot read it as ``what``."""
    try:
        return load(os.fspath(path))
    except Exception as error:
        raise PackageError(f"cannot load {path} as {what}: {type(error).__name__}: "
                           f"{error}") from None


def _check_callable_with(torch, model, names, where):
    if not callable(model):
        raise PackageError(f"{where} is a {type(model).__name__}, not a callable model")
    # A module's __call__ takes anything: forward says what it takes.
    call = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        inspect.signature(call).bind(**dict.fromkeys(names))
    except TypeError as error:
        raise PackageError(f"{where} cannot be called with the inputs "
                           f"{', '.join(names)} as keyword arguments: {error}") from None
    except ValueError:
        pass  # no signature to read (a builtin): the first call tells


def _compile_aot(torch, program, target):
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=target)
    except Exception as error:
        raise PackageError(f"AOTInductor could not compile the program: "
                           f"{type(error).__name__}: {error}") from None


def _device_type(program):
    """"cuda" if the program holds tensors on a GPU, else "cpu": what AOTInductor compiles
    for."""
    tensors = [*program.state_dict.values(), *program.constants.values()]
    return "cuda" if any(getattr(t, "is_cuda", False) for t in tensors) else "cpu"
