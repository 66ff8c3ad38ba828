"""The public entry points: load a package as a Model, self-check a package, and build one.

Design idea: the mode is a decision of ``load`` alone. The same package, specs and runner
code serve both modes; ``load`` picks in-process or out-of-process from its argument, else
from ``OPE_OUT_OF_PROCESS`` (so a whole job can switch without code changes), else from the
default.

Placement comes first, the same way (``placement``, else ``OPE_PLACEMENT``, else this host):
a model placed on a Ray cluster is handed to ope/placement/, whose actor calls this same
``load`` on its node.

Out of process, ``load`` also decides where the worker runs: which interpreter (the host's own
or a worker environment whose recorded versions satisfy the package's ``requires``, see
ope/envs/) and on which device. The host side only receives the result as its ``python``
and ``env_vars`` options.

The public builders (``package_torchscript``, ``package_torch_export``,
``package_torch_package``, ``package_python``, ``package_placeholder``, ``package_onnx``,
``package_keras``, ``package_tensorflow``) are those of ope/package/ with :func:`self_check` as
the check a package with test data passes before it appears at its path: loaded the way
``load`` loads by default (out of process, env="auto"), so a package whose requirements this
host does not meet is checked in a worker environment that does.
"""

import functools
import inspect
import os

import numpy as np

from ope import envs
from ope.errors import OpeError, PackageError
from ope.host.in_process import InProcessModel
from ope.package import (build, keras_model, onnx_builder, read_package, saved_model,
                         torch_builders)
from ope.placement import resolve_placement
from ope.requirements import ensure_requirements

__all__ = ["load", "self_check", "package_torchscript", "package_torch_export",
           "package_torch_package", "package_python", "package_placeholder", "package_onnx",
           "package_keras", "package_tensorflow", "OUT_OF_PROCESS_ENV"]

OUT_OF_PROCESS_ENV = "OPE_OUT_OF_PROCESS"
_DEFAULT_OUT_OF_PROCESS = True

_IN_PROCESS_HINT = ("Loading it out of process (ope.load(path), env='auto') runs it in a "
                    "worker environment that satisfies them: built from the package's lock, "
                    "or one made with ope env create NAME --python X.Y --require ....")


def load(path, *, out_of_process=None, timeout_s=None, env=None, build=None, device=None,
         replicas=None, placement=None, **worker_options):
    """Open the package at ``path`` and return a ready :class:`~ope.host.model.Model`.

    ``out_of_process``: True runs the model in a worker process, False in this process,
    None follows ``OPE_OUT_OF_PROCESS`` ("0"/"1") or the default. ``device``: "cpu" or
    "cuda:N", where the model and its inputs go (out of process, the worker sees that GPU
    alone). The other options apply to the out-of-process mode: ``timeout_s`` (default
    per-call deadline); ``env``: the worker's environment, "auto" (the default: this host's
    interpreter if it satisfies the package's ``requires``, else the environment built from
    the package's lock, else a registered environment that satisfies them, else that lock's
    environment built now: see ope/envs/selection.py), a name (``ope env list``) or the path
    of an interpreter or venv; ``build``: whether env="auto" may build an environment (None:
    ``OPE_BUILD_ENVS``, default yes; False only selects, for hosts that must not reach a
    package index); ``replicas``: N workers of the model behind one handle, each call going
    to the least busy; ``worker_options``: those of
    :class:`~ope.host.out_of_process.OutOfProcessModel` (``cpus``, ``threads``, ``env_vars``,
    ``standby``: loaded workers kept idle to take over after a fault, ...; an explicit
    ``python`` bypasses ``env``).

    ``placement``: where the model runs; None follows ``OPE_PLACEMENT`` (unset: this host),
    "local" is this host, "ray" or an :class:`ope.RayPlacement` a node of a Ray cluster, where
    this same ``load`` runs the model with the other options (ope/placement/).
    """
    package = read_package(path)
    placed = resolve_placement(placement)
    if placed is not None:
        from ope.placement.ray_model import load_on_ray
        return load_on_ray(package, placed, load, out_of_process=out_of_process,
                           timeout_s=timeout_s, env=env, build=build, device=device,
                           replicas=replicas, **worker_options)
    if _resolve_out_of_process(out_of_process):
        # The host side is only needed in this mode.
        from ope.host.out_of_process import OutOfProcessModel
        options = _placed(package, env, build, device, worker_options)
        if replicas is not None:
            from ope.host.replicas import ReplicaSet
            return ReplicaSet(package, replicas, timeout_s=timeout_s, **options)
        return OutOfProcessModel(package, timeout_s=timeout_s, **options)
    given = [name for name, value in (("env", env), ("build", build), ("replicas", replicas))
             if value is not None]
    if worker_options or given:
        raise TypeError(f"options {', '.join(sorted([*worker_options, *given]))} apply only "
                        f"out of process")
    ensure_requirements(package, hint=_IN_PROCESS_HINT)
    return InProcessModel(package, device=device)


def _placed(package, env, build, device, worker_options):
    """``worker_options`` with the interpreter and device variables ``env``/``device`` ask
    for: the host side only sees ``python`` and ``env_vars``."""
    options = dict(worker_options)
    env_vars = dict(options.get("env_vars") or {})
    if device is not None:
        device_vars = envs.device_env_vars(device)
        clash = sorted(set(device_vars) & set(env_vars))
        if clash:
            raise ValueError(f"device={device!r} sets {', '.join(clash)}; do not pass "
                             f"{'it' if len(clash) == 1 else 'them'} in env_vars as well")
        env_vars.update(device_vars)
        # The worker sees the one GPU asked for, as its GPU 0.
        options["device"] = "cpu" if device == "cpu" else "cuda:0"
    if options.get("python") is not None:
        if env is not None or build is not None:
            raise TypeError("pass env= or python=, not both (nor build= with python=): "
                            "python= names the interpreter")
    else:
        python = envs.select(package, "auto" if env is None else env, build=build)
        if python is not None:
            options["python"] = python
    if env_vars:
        options["env_vars"] = env_vars
    return options


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


def _self_checked(builder):
    """``builder`` (ope/package/build.py) with :func:`self_check` as its self-check and
    :func:`ope.envs.lock` as the lock of its requirements."""
    @functools.wraps(builder)
    def build_checked(*args, **options):
        return builder(*args, self_check=self_check, lock_requirements=envs.lock, **options)
    hidden = ("self_check", "lock_requirements")
    signature = inspect.signature(builder)
    build_checked.__signature__ = signature.replace(parameters=[
        parameter for parameter in signature.parameters.values() if parameter.name not in hidden])
    return build_checked


package_torchscript = _self_checked(torch_builders.package_torchscript)
package_torch_export = _self_checked(torch_builders.package_torch_export)
package_torch_package = _self_checked(torch_builders.package_torch_package)
package_python = _self_checked(build.package_python)
package_onnx = _self_checked(onnx_builder.package_onnx)
package_keras = _self_checked(keras_model.package_keras)
package_tensorflow = _self_checked(saved_model.package_tensorflow)
package_placeholder = build.package_placeholder  # no test data: nothing to self-check
