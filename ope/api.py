"""The public entry points: load a package as a Model, and self-check a package.

Design idea: the mode is a decision of ``load`` alone. The same package, specs and runner
code serve both modes; ``load`` picks in-process or out-of-process from its argument, else
from ``OPE_OUT_OF_PROCESS`` (so a whole job can switch without code changes), else from the
default.
"""

import os

import numpy as np

from ope.errors import OpeError, PackageError
from ope.model import InProcessModel
from ope.package import read_package
from ope.requirements import ensure_requirements

__all__ = ["load", "self_check", "OUT_OF_PROCESS_ENV"]

OUT_OF_PROCESS_ENV = "OPE_OUT_OF_PROCESS"
# The out-of-process host (ope.host) becomes the default once it lands.
_DEFAULT_OUT_OF_PROCESS = True

_IN_PROCESS_HINT = ("Loading it out of process, in a worker environment that satisfies them, "
                    "would run it.")


def load(path, *, out_of_process=None, timeout_s=None, **worker_options):
    """Open the package at ``path`` and return a ready :class:`~ope.model.Model`.

    ``out_of_process``: True runs the model in a worker process, False in this process,
    None follows ``OPE_OUT_OF_PROCESS`` ("0"/"1") or the default. ``timeout_s`` (default
    per-call deadline) and ``worker_options`` apply to the out-of-process mode.
    """
    package = read_package(path)
    if _resolve_out_of_process(out_of_process):
        from ope.host import OutOfProcessModel  # the host side is only needed in this mode
        return OutOfProcessModel(package, timeout_s=timeout_s, **worker_options)
    if worker_options:
        raise TypeError(f"options {', '.join(sorted(worker_options))} apply only out of process")
    ensure_requirements(package, hint=_IN_PROCESS_HINT)
    return InProcessModel(package)


def _resolve_out_of_process(out_of_process):
    if out_of_process is not None:
        return bool(out_of_process)
    setting = os.environ.get(OUT_OF_PROCESS_ENV, "")
    if setting == "":
        return _DEFAULT_OUT_OF_PROCESS
    if setting not in ("0", "1"):
        raise OpeError(f"{OUT_OF_PROCESS_ENV} must be 0 or 1, got {setting!r}")
    return setting == "1"


def self_check(path, **load_options):
    """Run the package's stored test inputs and compare with its stored outputs (allclose
    for floats, equality otherwise). Returns the outputs; PackageError naming the first
    output that differs, or if the package has no test data."""
    package = read_package(path)
    if not package.has_test_data:
        raise PackageError(f"package {package.name!r} has no test data to check")
    expected = package.test_outputs()
    with load(package.path, **load_options) as model:
        outputs = model.infer(package.test_inputs())
    for name, want in expected.items():
        _compare_output(package.name, name, want, outputs[name])
    return outputs


# Float tolerances per dtype: float16 carries ~3 significant digits.
_TOLERANCES = {"f2": (1e-2, 1e-3), "f4": (1e-4, 1e-5), "f8": (1e-7, 1e-9)}


def _compare_output(package_name, name, want, got):
    where = f"self-check of package {package_name!r}: output {name!r}"
    if got.shape != want.shape:
        raise PackageError(f"{where}: expected shape {want.shape}, got {got.shape}")
    if want.dtype.kind == "f":
        rtol, atol = _TOLERANCES[want.dtype.str[1:]]
        if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            worst = float(np.nanmax(np.abs(got.astype(np.float64) - want)))
            raise PackageError(f"{where}: values differ from the expected outputs (max abs "
                               f"difference {worst:.3g}, rtol={rtol}, atol={atol})")
    elif not np.array_equal(got, want):
        mismatches = int(np.count_nonzero(got != want))
        raise PackageError(f"{where}: {mismatches} of {want.size} values differ from the "
                           f"expected outputs")
