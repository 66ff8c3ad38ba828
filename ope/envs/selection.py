"""Choosing the interpreter a package's worker runs with, building its environment from the
package's lock when none fits.

With ``env="auto"`` the order is: this host's interpreter if it satisfies the package's
``requires``; the environment built from the package's lock, if it exists; any recorded
environment that satisfies the ``requires``; else, if the package carries a lock and builds
are allowed, that environment, built now (ope/envs/build.py: once for all processes, cached
and shared by every package with the same lock). Production hosts that must never reach a
package index turn building off per call (``build=False``) or for the whole process
(``OPE_BUILD_ENVS=0``): they then only select, and a missing environment is an EnvError that
says how to pre-build it.
"""

import os
import sys

from ope.errors import EnvError, OpeError
from ope.requirements import check_requirements
from ope.envs.build import ensure_env, locked_env
from ope.envs.progress import progress_reporter
from ope.envs.store import envs_dir, get, interpreter_at, list_envs, touch

__all__ = ["select", "BUILD_ENV"]

BUILD_ENV = "OPE_BUILD_ENVS"


def select(package, env="auto", *, build=None, progress=None):
    """The interpreter to run ``package``'s worker with, or None for this host's own.

    ``env``: "auto" (see the module docstring), a name, or the path of an interpreter or
    venv. ``build``: whether "auto" may build the environment of the package's lock (None:
    ``OPE_BUILD_ENVS``, default yes). ``progress``: called with a line per build step
    (default: a bar on a terminal, else lines on stderr). EnvError when nothing fits: it
    lists each candidate and the requirements it fails."""
    if env != "auto":
        if os.sep in env:
            return interpreter_at(env)
        return _used(get(env), package)
    failing = check_requirements(package.requires)
    if not failing:
        return None
    lock_text = package.lock_text()
    if lock_text is not None:
        ready = locked_env(lock_text)
        if ready is not None:
            return _used(ready, package)
    candidates = [(f"this host's interpreter {sys.executable}", failing)]
    for candidate in list_envs():
        failing = candidate.failures(package.requires)
        if not failing:
            return _used(candidate, package)
        candidates.append((f"env {candidate.name!r} (Python {candidate.python_version})",
                           failing))
    listing = "".join(f"\n  {who}: {'; '.join(why)}" for who, why in candidates)
    if lock_text is None:
        raise EnvError(f"no worker environment satisfies the requires of package "
                       f"{package.name!r} (environments under {envs_dir()}), and the package "
                       f"has no lock to build one from:{listing}\nCreate one with: ope env "
                       f"create NAME --python X.Y --require ..., or package it again with "
                       f"lock=True")
    if not _builds_allowed(build):
        raise EnvError(f"the environment of package {package.name!r} is not built and "
                       f"building is off (build=False or {BUILD_ENV}=0):{listing}\nPre-build "
                       f"it with: ope env create --from {package.path}")
    return _used(ensure_env(lock_text, progress=progress or progress_reporter()), package)


def _builds_allowed(build):
    if build is not None:
        return bool(build)
    setting = os.environ.get(BUILD_ENV, "1")
    if setting not in ("0", "1"):
        raise OpeError(f"{BUILD_ENV} must be 0 or 1, got {setting!r}")
    return setting == "1"


def _used(env, package):
    """``env``'s interpreter, noting its use by ``package`` (``ope env list``, ``gc``)."""
    if not os.path.isfile(env.python):
        raise EnvError(f"environment {env.name!r}: its interpreter {env.python} is gone; "
                       f"remove the environment and create it again")
    touch(env.name, package)
    return env.python
