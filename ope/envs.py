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

    ope-env.json   {"name", "kind": "created" | "registered", "python": interpreter path,
                    "python_version", "packages": {canonical name: version},
                    "requires": [PEP 508 strings asked for], "created": ISO time (UTC),
                    "ope_version", "ope_source": source fingerprint (created only)}
    bin/, lib/     the venv itself (created environments only; a registered one is elsewhere)

A worker of an environment runs its interpreter isolated (``-I``, see
ope.host.worker_process.WorkerProcess), so it imports the environment's ope and ope_native,
never the host's.

torch is never taken from the registry: a registry torch drags in gigabytes of CUDA libraries.
The one torch installed here is the CPU wheel in pip's find-links, for CPython 3.11.
"""

import collections
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ope.errors import EnvError
from ope.requirements import check_requirements

__all__ = ["Env", "HOME_ENV", "ope_home", "source_fingerprint", "find_python", "create",
           "register", "get", "list_envs", "remove", "select",
           "device_env_vars"]

HOME_ENV = "OPE_HOME"
_RECORD = "ope-env.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED = ("auto",)  # env="auto" asks for selection, so no environment may be called that
_LOCAL_TORCH = "2.13.0"
_LOCAL_TORCH_PYTHON = "3.11"
_SOURCE_DIRS = ("ope", "workers", "ope_native")
_SOURCE_SUFFIXES = (".py", ".c", ".h")
_BUILD_FILES = ("setup.py", "setup.cfg", "pyproject.toml")
_METADATA_FILES = ("README.md",)  # the build reads it (long_description); not in the fingerprint
_OUTPUT_TAIL_LINES = 30
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

def ope_home():
    """``$OPE_HOME``, default ``~/.cache/ope`` (``$XDG_CACHE_HOME/ope`` where that is set)."""
    home = os.environ.get(HOME_ENV)
    if home:
        return os.path.abspath(os.path.expanduser(home))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ope")


def _envs_dir():
    return os.path.join(ope_home(), "envs")


def _env_dir(name):
    if not _NAME.fullmatch(name) or name in _RESERVED:
        raise EnvError(f"environment name {name!r} is not allowed: use letters, digits, '.', "
                       f"'_' and '-', not starting with a symbol, and not {' or '.join(_RESERVED)}")
    return os.path.join(_envs_dir(), name)


def get(name):
    """The record of environment ``name``; EnvError naming the known ones if there is none."""
    path = os.path.join(_env_dir(name), _RECORD)
    try:
        with open(path) as file:
            return Env(**json.load(file))
    except FileNotFoundError:
        known = ", ".join(env.name for env in list_envs()) or "none"
        raise EnvError(f"no worker environment named {name!r} under {_envs_dir()} (known: "
                       f"{known}); create it with: ope env create {name} --python X.Y "
                       f"--require ...") from None
    except (OSError, ValueError, TypeError) as exc:
        raise EnvError(f"environment {name!r}: unreadable record {path}: {exc}") from None


def list_envs():
    """Every environment with a record, by name. A folder without one (a create in
    progress, or one that failed) is not an environment."""
    try:
        names = sorted(os.listdir(_envs_dir()))
    except FileNotFoundError:
        return []
    return [get(name) for name in names
            if os.path.isfile(os.path.join(_envs_dir(), name, _RECORD))]


def remove(name):
    """Delete environment ``name``: its venv, or for a registered one only the record."""
    get(name)  # EnvError for an unknown name, before anything is deleted
    shutil.rmtree(_env_dir(name))


# -- interpreters ---------------------------------------------------------------------------

def find_python(spec=None):
    """Path of the interpreter ``spec`` names: None (this host's), a path (an interpreter or
    a venv folder), or a version "X.Y" found as ``pythonX.Y`` on PATH or in pyenv's versions.
    EnvError saying where it looked if there is none."""
    if spec is None:
        return sys.executable
    if os.sep in spec or os.path.exists(spec):
        return _interpreter_at(spec)
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
            facts = _probe(candidate)
        except EnvError:
            continue  # e.g. a pyenv shim for a version that is installed but not enabled
        if (facts["python_version"] + ".").startswith(spec + "."):
            return facts["executable"]
    raise EnvError(f"no Python {spec} found: looked for python{minor} on PATH and in "
                   f"{pyenv_root}/versions/{spec}*; install it (e.g. pyenv install {spec}) "
                   f"or pass the interpreter's path")


def _interpreter_at(path):
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        path = os.path.join(path, "bin", "python")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise EnvError(f"{path} is not an executable Python interpreter or virtualenv")
    return path


def _probe(python):
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


# -- creating and registering -------------------------------------------------------------

def create(name, python=None, requires=(), log=print):
    """Create environment ``name``: a venv of interpreter ``python`` (see :func:`find_python`;
    default this host's) with this project and ``requires`` (PEP 508 strings such as
    "numpy<2") installed. Each line pip prints goes to ``log`` as it comes. Returns the
    record; on failure nothing is left behind and EnvError names the cause."""
    target = _env_dir(name)
    interpreter = find_python(python)
    python_version = _probe(interpreter)["python_version"]
    requires = list(requires)
    constraints = _torch_constraints(requires, python_version)
    source = _source_root()
    os.makedirs(_envs_dir(), exist_ok=True)
    try:
        os.mkdir(target)  # claims the name: two creates of one name cannot both proceed
    except FileExistsError:
        raise EnvError(f"environment {name!r} already exists at {target}; remove it first "
                       f"(ope env remove {name})") from None
    try:
        _run([interpreter, "-m", "venv", target], log, f"creating the venv of {name!r}")
        venv_python = os.path.join(target, "bin", "python")
        _install(venv_python, source, requires, constraints, log, name)
        return _write_record(_record(name, "created", venv_python, requires,
                                     ope_source=source_fingerprint()))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def register(name, path):
    """Record an existing interpreter or venv (which must have ope installed) as ``name``."""
    target = _env_dir(name)
    python = _interpreter_at(path)
    env = _record(name, "registered", python, [])
    if not env.ope_version:
        raise EnvError(f"{python} has no ope installed, so it cannot run a worker: install "
                       f"this project into it (pip install /path/to/ope) or use ope env create")
    try:
        os.makedirs(target)
    except FileExistsError:
        raise EnvError(f"environment {name!r} already exists at {target}") from None
    return _write_record(env)


def _record(name, kind, python, requires, ope_source=None):
    facts = _probe(python)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Env(name=name, kind=kind, python=python, python_version=facts["python_version"],
               packages=facts["packages"], requires=requires, created=created,
               ope_version=facts["packages"].get("ope"), ope_source=ope_source)


def _write_record(env):
    path = os.path.join(_env_dir(env.name), _RECORD)
    with open(path + ".tmp", "w") as file:
        json.dump(dataclasses.asdict(env), file, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)  # a reader sees the whole record or none
    return env


def _torch_constraints(requires, python_version):
    """pip constraints that keep torch to the local CPU wheel; EnvError for a requirement
    that would need any other torch."""
    local_python = (python_version + ".").startswith(_LOCAL_TORCH_PYTHON + ".")
    for text in requires:
        try:
            requirement = Requirement(text)
        except InvalidRequirement as exc:
            raise EnvError(f"requirement {text!r} is not a PEP 508 requirement: {exc}") from None
        if canonicalize_name(requirement.name) != "torch":
            continue
        if not local_python or not requirement.specifier.contains(_LOCAL_TORCH):
            raise EnvError(
                f"cannot install {text!r} on Python {python_version}: the only torch ope "
                f"installs is the local CPU wheel torch=={_LOCAL_TORCH} for Python "
                f"{_LOCAL_TORCH_PYTHON}; a torch from the package registry brings gigabytes "
                f"of CUDA libraries")
    # Constraints also bind what other packages pull in; "<0" matches no release at all, so
    # a dependency on torch fails the resolution instead of downloading one.
    return f"torch=={_LOCAL_TORCH}\n" if local_python else "torch<0\n"


def _install(venv_python, source, requires, constraints, log, name):
    # The build runs on a copy: an in-tree build would write build/ and *.egg-info into the
    # source, and two creates at once would build in the same folder.
    with tempfile.TemporaryDirectory(prefix="ope-env-") as stage:
        project = os.path.join(stage, "ope")
        _copy_source(source, project)
        constraints_file = os.path.join(stage, "constraints.txt")
        with open(constraints_file, "w") as file:
            file.write(constraints)
        _run([venv_python, "-m", "pip", "install", "--no-input", "-c", constraints_file,
              project, *requires], log, f"installing ope and {requires or 'nothing else'} "
              f"into {name!r}")


def _run(command, log, doing):
    """Run ``command``, passing each output line to ``log``; EnvError with the last lines
    if it fails."""
    tail = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace") as proc:
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                log(tail[-1])
    except OSError as exc:
        raise EnvError(f"{doing} failed: cannot run {command[0]}: {exc}") from None
    if proc.returncode != 0:
        raise EnvError(f"{doing} failed ({' '.join(command[:4])} ... exited with code "
                       f"{proc.returncode}); its last output:\n" + "\n".join(tail))


# -- this project's source ------------------------------------------------------------------

def _source_root():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not all(os.path.isfile(os.path.join(root, name)) for name in _BUILD_FILES):
        raise EnvError(f"ope's source tree is not at {root} (ope was installed from a wheel?): "
                       f"creating an environment builds ope from its source")
    return root


def _source_files(root):
    """Relative paths of the files that make up the worker runtime, in a stable order."""
    paths = [name for name in _BUILD_FILES if os.path.isfile(os.path.join(root, name))]
    for folder in _SOURCE_DIRS:
        for here, dirs, files in os.walk(os.path.join(root, folder)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            paths += sorted(os.path.relpath(os.path.join(here, name), root)
                            for name in files if name.endswith(_SOURCE_SUFFIXES))
    return paths


def source_fingerprint():
    """sha256 of ope's build files and of the sources in ope/, workers/ and ope_native/: an
    environment built from the same fingerprint runs the same worker runtime."""
    root = _source_root()
    digest = hashlib.sha256()
    for relative in _source_files(root):
        digest.update(relative.encode() + b"\0")
        with open(os.path.join(root, relative), "rb") as file:
            digest.update(file.read() + b"\0")
    return digest.hexdigest()


def _copy_source(root, target):
    for relative in (*_source_files(root), *_METADATA_FILES):
        os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
        shutil.copy2(os.path.join(root, relative), os.path.join(target, relative))


# -- choosing an environment and starting its workers --------------------------------------

def select(package, env="auto"):
    """The interpreter to run ``package``'s worker with, or None for this host's own.

    ``env``: "auto" (this host's interpreter if it satisfies the package's ``requires``,
    else the first environment by name whose record does), a name, or the path of an
    interpreter or venv. EnvError when "auto" finds none: it lists each candidate and the
    requirements it fails."""
    if env != "auto":
        if os.sep in env:
            return _interpreter_at(env)
        return _existing_interpreter(get(env))
    failing = check_requirements(package.requires)
    if not failing:
        return None
    candidates = [(f"this host's interpreter {sys.executable}", failing)]
    for candidate in list_envs():
        failing = candidate.failures(package.requires)
        if not failing:
            return _existing_interpreter(candidate)
        candidates.append((f"env {candidate.name!r} (Python {candidate.python_version})",
                           failing))
    listing = "".join(f"\n  {who}: {'; '.join(why)}" for who, why in candidates)
    raise EnvError(f"no worker environment satisfies the requires of package "
                   f"{package.name!r} (environments under {_envs_dir()}):{listing}\n"
                   f"Create one with: ope env create NAME --python X.Y --require ...")


def _existing_interpreter(env):
    if not os.path.isfile(env.python):
        raise EnvError(f"environment {env.name!r}: its interpreter {env.python} is gone; "
                       f"remove the environment and create it again")
    return env.python


def device_env_vars(device):
    """Environment variables that give a worker ``device``: "cpu" hides every GPU; "cuda" or
    "cuda:N" shows GPU N (nvidia-smi's index) alone, by UUID where nvidia-smi can tell it, so
    a CUDA_VISIBLE_DEVICES of the host does not renumber it."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    match = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if not match:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    index = int(match.group(1) or 0)
    uuids = _gpu_uuids()
    if uuids is None:
        # Without nvidia-smi an index is all there is; PCI order is the order nvidia-smi uses.
        return {"CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if index not in uuids:
        raise EnvError(f"device {device!r}: there is no GPU {index} (nvidia-smi lists "
                       f"{', '.join(map(str, sorted(uuids))) or 'none'})")
    return {"CUDA_VISIBLE_DEVICES": uuids[index]}


def _gpu_uuids():
    """{index: UUID} from nvidia-smi, or None where it is missing or fails."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return None
    try:
        done = subprocess.run([nvidia_smi, "--query-gpu=index,uuid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    rows = (line.split(",") for line in done.stdout.splitlines() if line.strip())
    return {int(index): uuid.strip() for index, uuid in rows}
