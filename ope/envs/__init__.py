"""Named worker environments: virtualenvs that run models the host's interpreter cannot.

Design idea: an environment is known by what was *recorded* when it was made, not by asking
it again. :func:`create` builds a venv under ``$OPE_HOME/envs/NAME`` (``OPE_HOME`` defaults to
``~/.cache/ope``), installs this project's source tree into it (which builds ``ope_native``
for that Python) plus the requirements, then runs the new interpreter once and records its
Python version and every installed distribution. Choosing an environment for a package is
then a pure check of the package's ``requires`` against those records, with the same
function a worker applies to itself (:func:`ope.requirements.check_requirements`): selection
starts no process, and when nothing fits the error says, per candidate, what fails.

Layout of ``$OPE_HOME/envs/NAME``::

    ope-env.json   {"name", "kind": "created" | "registered" | "locked", "python":
                    interpreter path, "python_version", "packages": {canonical name:
                    version}, "requires": [PEP 508 strings asked for, or a lock's pins],
                    "created": ISO time (UTC), "ope_version", "ope_source": source
                    fingerprint (built ones only), "key": the lock key (locked only)}
    last-used      its mtime is the environment's last use
    used-by.json   {package path: package name} of the packages that selected it
    bin/, lib/     the venv itself (built environments only; a registered one is elsewhere)

Environments built from a *lock* (:func:`lock`: exact pins with hashes of a package's
requirements and ope's runtime requirements, resolved for a target Python) are kind "locked",
named ``lock-KEY`` after sha256 of (Python version, lock text, ope's source fingerprint), and
shared by every package with that lock: :func:`ensure_env` finds or builds one. They are
the ones ``ope env gc`` may remove, by last use (``last-used``, touched whenever an
environment is selected or ensured) and size. Next to them, ``.lock-KEY.lock`` is the build's
file lock and ``.stage-lock-KEY`` a build in progress (or the remains of a killed one).

Builds use uv where it is installed (``uv venv`` + ``uv pip install``), else venv + pip
(``OPE_ENV_TOOL=pip`` forces pip, ``=uv`` requires uv), and take packages only where the
install policy (ope.install_policy) says.

A worker of an environment runs its interpreter isolated (``-I``, see
ope.host.worker_process.WorkerProcess), so it imports the environment's ope and ope_native,
never the host's.
"""

from ope.install_policy import HOME_ENV, ope_home
from ope.envs.source import source_fingerprint
from ope.package.format import LOCK_FILE
from ope.envs.store import (Env, find_python, gc, get, last_used, list_envs, remove,
                            size_on_disk, used_by)
from ope.envs.build import (TOOL_ENV, create, ensure_env, lock, lock_pins, lock_python,
                            register, requirement_strings)
from ope.envs.selection import BUILD_ENV, select
from ope.envs.progress import progress_reporter
from ope.envs.devices import device_env_vars

__all__ = ["Env", "HOME_ENV", "TOOL_ENV", "BUILD_ENV", "LOCK_FILE", "progress_reporter",
           "ope_home", "source_fingerprint", "find_python", "create", "register", "get", "list_envs", "remove", "select",
           "requirement_strings", "lock", "lock_python", "lock_pins", "ensure_env",
           "last_used", "used_by", "size_on_disk", "gc", "device_env_vars"]
