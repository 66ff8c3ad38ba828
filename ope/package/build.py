"""Building packages: a package is written into a staging folder beside its destination,
hashed into its manifest, checked there, and renamed into place, so a package that exists on
disk is complete and has passed its own test; the staging folder never survives a failure.

The check of a package with test data runs its model: ``self_check(path)``, a callable the
caller passes in, loads the staged package and compares its outputs with the stored ones
(ope.api passes its own, which loads the way ``ope.load`` does by default, so a package whose
requirements only a worker environment meets is checked there). This layer only knows the
format and the runners: a package without test data whose builder asks for it (the torch
builders, ope/package/torch_builders.py) is checked by loading its model in this process.

A package whose requirements this interpreter does not meet (or that is given to another
Python, ``python="3.10"``) is locked before it is checked: ``lock_requirements``, also passed
in by ope.api, resolves its ``requires`` into exact pins (:class:`Environment`), stored as
requirements.lock under the manifest, so the self-check and every later load build the same
worker environment from it.
"""

import json
import os
import platform
import shutil
import tempfile

import numpy as np

from ope.errors import EnvError, PackageError
from ope.package.format import (_CODE_DIR, _CONFIG, _DATA_DIR, _MANIFEST,
                                _TEST_INPUTS, _TEST_OUTPUTS, FORMAT, FORMAT_VERSION, FRAMEWORKS,
                                LOCK_FILE, _code_modules, _entrypoint_problem,
                                _foreign_entrypoint, _list_files, _sha256, _walk,
                                python_requirement, read_package)
from ope.requirements import PROVIDERS, check_requirements, parse_specifier
from ope.runners import load_runner
from ope.spec import as_specs, validate_inputs, validate_outputs

__all__ = ["package_python", "package_placeholder", "Environment"]


def package_python(path, *, name, code_dir, entrypoint, data_dir=None, framework="numpy",
                   inputs, outputs, requires=None, python=None, lock="auto", test_inputs=None,
                   test_outputs=None, self_check, lock_requirements):
    """Package Python code: ``code_dir`` is copied into the package and ``entrypoint``
    ("package.module:factory") is imported from it. ``factory(data_dir)`` (the copied
    ``data_dir`` or None) returns a callable taking one keyword argument per input and
    returning a dict of outputs. ``framework="torch"`` hands it torch tensors instead of numpy
    arrays. Given test data, the finished package is self-checked by ``self_check`` (the
    module docstring). Returns the Package."""
    problem = _entrypoint_problem(entrypoint)
    if problem:
        raise PackageError(problem)
    if framework not in FRAMEWORKS:
        raise PackageError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")

    def write_artefacts(staging):
        _copy_tree(code_dir, os.path.join(staging, _CODE_DIR), "code_dir")
        problem = _foreign_entrypoint(entrypoint, _code_modules(_list_files(staging)),
                                      f"code_dir {code_dir!r}")
        if problem:
            raise PackageError(problem)
        if data_dir is not None:
            _copy_tree(data_dir, os.path.join(staging, _DATA_DIR), "data_dir")
        return {"entrypoint": entrypoint, "framework": framework}

    if framework == "torch":
        requires = _with_requirement(requires, "torch")
    return _build(path, "python", write_artefacts, name=name, inputs=inputs, outputs=outputs,
                  requires=requires, test_inputs=test_inputs, test_outputs=test_outputs,
                  load_check=False, self_check=self_check,
                  environment=Environment(python, lock, lock_requirements))


def package_placeholder(path, *, name, inputs, outputs):
    """Package a stand-in that returns random outputs of the spec'd dtypes and shapes: lets
    callers integrate against a model's interface before the model exists."""
    return _build(path, "placeholder", lambda staging: {}, name=name, inputs=inputs,
                  outputs=outputs, requires=None, test_inputs=None, test_outputs=None,
                  load_check=False, self_check=None, environment=None)


def _build(path, runner, write_artefacts, *, name, inputs, outputs, requires, test_inputs,
           test_outputs, load_check, self_check, environment):
    """Stage, write, hash, check, then rename into place; the staging folder never survives
    a failure. ``environment``: the package's Python and lock (:class:`Environment`), or None
    for a package with no requirements."""
    destination = os.path.abspath(os.fspath(path))
    if not isinstance(name, str) or not name:
        raise PackageError(f"package name must be a non-empty string, got {name!r}")
    inputs, outputs = as_specs(inputs, "input"), as_specs(outputs, "output")
    requires = _checked_requires(requires)
    if environment is not None:
        requires = environment.add_python(requires)
    _check_destination_free(destination)
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.staging-", dir=parent)
    try:
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
                  "runner": runner, "inputs": [spec.to_dict() for spec in inputs],
                  "outputs": [spec.to_dict() for spec in outputs], "requires": requires,
                  "test_data": _write_test_data(staging, inputs, outputs, test_inputs,
                                                test_outputs)}
        config.update(write_artefacts(staging))
        if environment is not None:
            config.update(environment.write_lock(staging, name, requires))
        _write_json(os.path.join(staging, _CONFIG), config)
        _write_json(os.path.join(staging, _MANIFEST), {
            "algorithm": "sha256",
            "files": {rel: _sha256(os.path.join(staging, rel)) for rel in sorted(_list_files(staging))},
        })
        _check_staged(staging, load_check, self_check)
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_package(destination)


class Environment:
    """What a package says about the environment it runs in: its Python (``python``, "X.Y" or
    None for any) and whether its ``requires`` are locked into it (``lock``: True, False, or
    "auto": when this interpreter does not satisfy them, i.e. when the package will need a
    worker environment of its own). ``lock_requirements(requires, python_version)`` returns
    the lock text (ope.envs.lock: a layer above this one, so it is passed in); an EnvError
    from it becomes a PackageError."""

    def __init__(self, python, lock, lock_requirements):
        if python is not None and not (isinstance(python, str) and python_requirement(python)):
            raise PackageError(f"python must be a version such as \"3.10\", got {python!r}")
        if lock not in (True, False, "auto"):
            raise PackageError(f"lock must be True, False or \"auto\", got {lock!r}")
        self.python, self.lock, self.lock_requirements = python, lock, lock_requirements

    def add_python(self, requires):
        """``requires`` with the entry for the package's Python, if it names one."""
        if self.python is None:
            return requires
        if "python" in requires:
            raise PackageError("give the package's Python as python=\"X.Y\" or as "
                               "requires[\"python\"], not both")
        return {**requires, "python": python_requirement(self.python)}

    def write_lock(self, staging, name, requires):
        """Write the lock into ``staging`` if the package gets one; returns the config
        entries it adds."""
        entries = {"python": self.python} if self.python else {}
        if not (self.lock is True or (self.lock == "auto" and check_requirements(requires))):
            return entries
        python = self._target_python(requires)
        if python is None:
            if self.lock is True:
                raise PackageError(f"package {name!r}: requires[\"python\"] "
                                   f"{requires['python']!r} excludes this Python; name the one "
                                   f"to lock for with python=\"X.Y\"")
            return entries
        try:
            text = self.lock_requirements(requires, python)
        except EnvError as exc:
            raise PackageError(f"package {name!r}: cannot lock its requirements for Python "
                               f"{python}: {exc}") from exc
        with open(os.path.join(staging, LOCK_FILE), "w", encoding="utf-8") as file:
            file.write(text)
        return entries

    def _target_python(self, requires):
        """The Python to lock for: the package's own, else this one if requires allow it."""
        if self.python is not None:
            return self.python
        if "python" in requires and check_requirements({"python": requires["python"]}):
            return None
        return ".".join(platform.python_version_tuple()[:2])


def _check_staged(staging, load_check, self_check):
    package = read_package(staging)
    if package.has_test_data:
        self_check(package.path)
    elif load_check:
        load_runner(package).close()


def _write_test_data(staging, inputs, outputs, test_inputs, test_outputs):
    if test_inputs is None and test_outputs is None:
        return False
    if test_inputs is None or test_outputs is None:
        raise PackageError("give both test_inputs and test_outputs, or neither")
    arrays, bindings = validate_inputs(inputs, test_inputs)
    expected = validate_outputs(outputs, test_outputs, bindings)
    os.makedirs(os.path.join(staging, "test_data"))
    np.savez(os.path.join(staging, _TEST_INPUTS), **arrays)
    np.savez(os.path.join(staging, _TEST_OUTPUTS), **expected)
    return True


def _checked_requires(requires):
    requires = dict(requires or {})
    for requirement, specifier in requires.items():
        if not isinstance(requirement, str) or not requirement:
            raise PackageError(f"requires: names must be non-empty strings, got {requirement!r}")
        parse_specifier(requirement, specifier)
    return requires


def _with_requirement(requires, name):
    """``requires`` plus ``name`` (any version) unless it already constrains it or one of the
    distributions that provide it (e.g. tensorflow-cpu for tensorflow)."""
    requires = dict(requires or {})
    if not any(provider in requires for provider in PROVIDERS.get(name, (name,))):
        requires[name] = ""
    return requires


def _check_destination_free(destination):
    if os.path.exists(destination) and not (os.path.isdir(destination)
                                            and not os.listdir(destination)):
        raise PackageError(f"cannot create package at {destination}: it already exists")


def _move_into_place(staging, destination):
    if os.path.isdir(destination):
        os.rmdir(destination)  # empty (checked before); rename needs it gone
    os.rename(staging, destination)


def _copy_file(source, target):
    try:
        shutil.copyfile(source, target)
    except OSError as error:
        raise PackageError(f"cannot copy {source}: {error}") from None


def _copy_tree(source, target, what):
    if not os.path.isdir(source):
        raise PackageError(f"{what} {source!r} is not a directory")
    list(_walk(source, f"{what} {source!r}"))  # refuses links before anything is copied
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _write_json(filename, data):
    with open(filename, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, sort_keys=True)
        file.write("\n")
