"""Environment records: where environments live, what each recorded when it was made, the
interpreters they run, their use, size and garbage collection, and choosing one for a
package (the design: ope/envs/__init__.py)."""

import contextlib
import dataclasses
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from packaging.utils import canonicalize_name

from ope.errors import EnvError
from ope.install_policy import ope_home
from ope.requirements import check_requirements
from ope.envs.source import source_fingerprint

RECORD = "ope-env.json"
_LAST_USED = "last-used"
_USED_BY = "used-by.json"
LOCKED_PREFIX = "lock-"
LOG = logging.getLogger("ope.envs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED = ("auto",)  # env="auto" asks for selection, so no environment may be called that
# Run inside an interpreter: the facts an environment record keeps.
_PROBE = """
import importlib.metadata, json, platform, sys
print(json.dumps({"executable": sys.executable, "python_version": platform.python_version(),
                  "packages": {d.metadata["Name"]: d.version
                               for d in importlib.metadata.distributions()
                               if d.metadata["Name"]}}))
"""


@dataclasses.dataclass(frozen=True)
class Env:
    """The record of one worker environment (see the module docstring for the fields)."""

    name: str
    kind: str
    python: str
    python_version: str
    packages: dict
    requires: list
    created: str
    ope_version: str
    ope_source: str = None
    key: str = None

    def version_of(self, name):
        """Recorded version of distribution ``name`` ("python": the interpreter), or None."""
        if name == "python":
            return self.python_version
        return self.packages.get(canonicalize_name(name))

    def failures(self, requires):
        """Requirements of ``requires`` (a package's name -> specifier map) this env fails."""
        return check_requirements(requires, self.version_of)

    @property
    def stale(self):
        """Built from other ope source than this host's (None: unknown, e.g. registered)."""
        if self.ope_source is None:
            return None
        try:
            return self.ope_source != source_fingerprint()
        except EnvError:
            return None  # this host has no source tree to compare with


# -- where environments live -------------------------------------------------------------

def envs_dir():
    return os.path.join(ope_home(), "envs")


def env_dir(name):
    if not _NAME.fullmatch(name) or name in _RESERVED:
        raise EnvError(f"environment name {name!r} is not allowed: use letters, digits, '.', "
                       f"'_' and '-', not starting with a symbol, and not {' or '.join(_RESERVED)}")
    return os.path.join(envs_dir(), name)


def get(name):
    """The record of environment ``name``; EnvError naming the known ones if there is none."""
    path = os.path.join(env_dir(name), RECORD)
    try:
        with open(path) as file:
            return Env(**json.load(file))
    except FileNotFoundError:
        known = ", ".join(env.name for env in list_envs()) or "none"
        raise EnvError(f"no worker environment named {name!r} under {envs_dir()} (known: "
                       f"{known}); create it with: ope env create {name} --python X.Y "
                       f"--require ...") from None
    except (OSError, ValueError, TypeError) as exc:
        raise EnvError(f"environment {name!r}: unreadable record {path}: {exc}") from None


def list_envs():
    """Every environment with a record, by name. A folder without one (a create in
    progress, or one that failed) is not an environment."""
    try:
        names = sorted(os.listdir(envs_dir()))
    except FileNotFoundError:
        return []
    # Dot names are staging folders and build locks, never environments.
    return [get(name) for name in names if not name.startswith(".")
            and os.path.isfile(os.path.join(envs_dir(), name, RECORD))]


def remove(name):
    """Delete environment ``name``: its venv, or for a registered one only the record."""
    get(name)  # EnvError for an unknown name, before anything is deleted
    shutil.rmtree(env_dir(name))


# -- interpreters ---------------------------------------------------------------------------

def find_python(spec=None):
    """Path of the interpreter ``spec`` names: None (this host's), a path (an interpreter or
    a venv folder), or a version "X.Y" found as ``pythonX.Y`` on PATH or in pyenv's versions.
    EnvError saying where it looked if there is none."""
    if spec is None:
        return sys.executable
    if os.sep in spec or os.path.exists(spec):
        return interpreter_at(spec)
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", spec):
        raise EnvError(f"python must be a version such as 3.12 or an interpreter path, "
                       f"got {spec!r}")
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    minor = ".".join(spec.split(".")[:2])
    candidates = [shutil.which(f"python{minor}"),
                  *sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{spec}*", "bin",
                                                 "python")), reverse=True)]
    for candidate in filter(None, candidates):
        try:
            facts = probe(candidate)
        except EnvError:
            continue  # e.g. a pyenv shim for a version that is installed but not enabled
        if (facts["python_version"] + ".").startswith(spec + "."):
            return facts["executable"]
    raise EnvError(f"no Python {spec} found: looked for python{minor} on PATH and in "
                   f"{pyenv_root}/versions/{spec}*; install it (e.g. pyenv install {spec}) "
                   f"or pass the interpreter's path")


def interpreter_at(path):
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        path = os.path.join(path, "bin", "python")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise EnvError(f"{path} is not an executable Python interpreter or virtualenv")
    return path


def probe(python):
    """Version, executable and installed distributions, as ``python`` itself reports them."""
    try:
        done = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvError(f"cannot run {python}: {exc}") from None
    if done.returncode != 0:
        raise EnvError(f"{python} failed to report its version and packages: "
                       f"{done.stderr.strip()[-500:]}")
    facts = json.loads(done.stdout)
    facts["packages"] = {canonicalize_name(name): version
                         for name, version in facts["packages"].items()}
    return facts


# -- use, size and garbage collection -------------------------------------------------------

def touch(name, package=None):
    """Note a use of environment ``name`` now (for ``ope env gc``), by ``package`` if given
    (for ``ope env list``)."""
    if package is not None:
        _note_user(name, package)
    path = os.path.join(envs_dir(), name, _LAST_USED)
    try:
        os.utime(path)
    except FileNotFoundError:
        try:
            with open(path, "a"):
                pass
        except OSError:
            pass  # a read-only home: last use is then the record's time
    except OSError:
        pass


def _note_user(name, package):
    """Add ``package`` to the environment's users: best effort (two processes adding at once
    may keep only one of them; the next use adds it again), never an error for the load."""
    path = os.path.join(envs_dir(), name, _USED_BY)
    users = used_by(name)
    if users.get(package.path) == package.name:
        return
    users[package.path] = package.name
    try:
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as file:
            json.dump(users, file)
        os.replace(file.name, path)
    except OSError:
        pass


def used_by(name):
    """The packages that used environment ``name``: package path -> package name."""
    try:
        with open(os.path.join(envs_dir(), name, _USED_BY)) as file:
            users = json.load(file)
    except (OSError, ValueError):
        return {}
    return users if isinstance(users, dict) else {}


def last_used(env):
    """When environment ``env`` was last selected or ensured (seconds since the epoch)."""
    folder = os.path.join(envs_dir(), env.name)
    for name in (_LAST_USED, RECORD):
        try:
            return os.stat(os.path.join(folder, name)).st_mtime
        except FileNotFoundError:
            continue
    return 0.0


def size_on_disk(env):
    """Bytes the environment's folder takes (a registered one: its record only); a file
    hard-linked several times inside it counts once."""
    seen, total = set(), 0
    for here, _, files in os.walk(os.path.join(envs_dir(), env.name)):
        for name in files:
            try:
                info = os.lstat(os.path.join(here, name))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


@contextlib.contextmanager
def build_lock(name, say=None):
    """Hold the file lock of environment ``name`` (``.NAME.lock`` beside it): builds and
    removals of one environment, in any process, take turns. Waits for it when ``say`` is
    given (and says so), else raises BlockingIOError if another holds it."""
    os.makedirs(envs_dir(), exist_ok=True)
    fd = os.open(os.path.join(envs_dir(), f".{name}.lock"), os.O_RDWR | os.O_CREAT |
                 os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say is None:
                raise
            say("another process is building it; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; a killed holder's lock is released by the kernel


def gc(unused_days=None, max_bytes=None, now=None):
    """Remove environments built from locks that were unused for ``unused_days``, then,
    least recently used first, until the rest take at most ``max_bytes``. Named environments
    (created or registered) are the user's and stay. One being built is skipped. Returns
    the names removed."""
    now = time.time() if now is None else now
    locked = sorted((env for env in list_envs() if env.kind == "locked"), key=last_used)
    sizes = {env.name: size_on_disk(env) for env in locked}
    total = sum(sizes.values())
    removed = []
    for env in locked:
        old = unused_days is not None and now - last_used(env) > unused_days * 86400
        over = max_bytes is not None and total > max_bytes
        if not (old or over):
            continue
        try:
            with build_lock(env.name):
                shutil.rmtree(os.path.join(envs_dir(), env.name))
                os.unlink(os.path.join(envs_dir(), f".{env.name}.lock"))
        except BlockingIOError:
            continue  # being built or rebuilt right now
        total -= sizes[env.name]
        removed.append(env.name)
    _remove_stale_wheels()
    return removed


def wheel_folder(python_version):
    """Where ope's wheel for Python ``python_version`` ("X.Y") built from this source is
    kept (ope.envs.build.Tool.ope_wheel)."""
    return os.path.join(ope_home(), "wheels", f"{source_fingerprint()[:16]}-py{python_version}")


def _remove_stale_wheels():
    """Wheels built from other versions of ope's source: no environment build takes them."""
    current = wheel_folder("")  # the folder name's prefix shared by every Python version
    for folder in glob.glob(os.path.join(os.path.dirname(current), "*")):
        if not os.path.basename(folder).startswith(os.path.basename(current)):
            shutil.rmtree(folder, ignore_errors=True)
