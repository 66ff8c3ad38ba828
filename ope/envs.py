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
ope.supervisor.WorkerProcess), so it imports the environment's ope and ope_native, never the
host's.
"""

import collections
import collections.abc
import configparser
import contextlib
import dataclasses
import datetime
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ope.errors import EnvError
from ope.install_policy import ENV_VARS, config_path, load_policy
from ope.requirements import check_requirements

__all__ = ["Env", "HOME_ENV", "TOOL_ENV", "LOCK_FILE", "ope_home", "source_fingerprint",
           "find_python", "create", "register", "get", "list_envs", "remove", "select",
           "requirement_strings", "lock", "lock_python", "lock_pins", "ensure_env",
           "last_used", "size_on_disk", "gc", "device_env_vars"]

HOME_ENV = "OPE_HOME"
TOOL_ENV = "OPE_ENV_TOOL"
LOCK_FILE = "requirements.lock"
_RECORD = "ope-env.json"
_LAST_USED = "last-used"
_LOCKED_PREFIX = "lock-"
_LOCK_HEADER = "# ope lock for Python {python}"
_LOCK_HEADER_RE = re.compile(r"# ope lock for Python (\d+\.\d+)\n")
# uv is what builds environments; a worker never runs it, so no environment gets a copy.
_HOST_ONLY = ("uv",)
_TOOL_TIMEOUT_S = 600
# Lower-cased fragments of uv's and pip's errors when the index cannot be reached at all.
_UNREACHABLE_SIGNS = ("failed to fetch", "error sending request", "dns error",
                      "connection refused", "could not fetch url", "network is unreachable",
                      "failed to establish a new connection", "name or service not known",
                      "temporary failure in name resolution", "max retries exceeded")
_LOG = logging.getLogger("ope.envs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED = ("auto",)  # env="auto" asks for selection, so no environment may be called that
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
    # Dot names are staging folders and build locks, never environments.
    return [get(name) for name in names if not name.startswith(".")
            and os.path.isfile(os.path.join(_envs_dir(), name, _RECORD))]


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
    "numpy<2") installed under the install policy (ope.install_policy). Each line the
    installer prints goes to ``log`` as it comes. Returns the record; on failure nothing is
    left behind and EnvError names the cause."""
    target = _env_dir(name)
    interpreter = find_python(python)
    requires = list(requires)
    for text in requires:
        _requirement(text)
    source = _source_root()
    os.makedirs(_envs_dir(), exist_ok=True)
    try:
        os.mkdir(target)  # claims the name: two creates of one name cannot both proceed
    except FileExistsError:
        raise EnvError(f"environment {name!r} already exists at {target}; remove it first "
                       f"(ope env remove {name})") from None
    try:
        tool = _Tool(load_policy(), log)
        tool.venv(interpreter, target, f"creating the venv of {name!r}")
        venv_python = os.path.join(target, "bin", "python")
        with tempfile.TemporaryDirectory(prefix="ope-env-") as stage:
            project = _project_copy(source, stage)
            tool.install(venv_python, [project, *requires],
                         f"installing ope and {requires or 'nothing else'} into {name!r}")
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


def _record(name, kind, python, requires, ope_source=None, key=None, probe_python=None):
    facts = _probe(probe_python or python)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Env(name=name, kind=kind, python=python, python_version=facts["python_version"],
               packages=facts["packages"], requires=requires, created=created,
               ope_version=facts["packages"].get("ope"), ope_source=ope_source, key=key)


def _write_record(env, folder=None):
    path = os.path.join(folder or _env_dir(env.name), _RECORD)
    with open(path + ".tmp", "w") as file:
        json.dump(dataclasses.asdict(env), file, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)  # a reader sees the whole record or none
    return env


def _run(command, log, doing, env=None):
    """Run ``command``, passing each output line to ``log``; EnvError with the last lines
    if it fails."""
    tail = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace",
                              env=env) as proc:
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                log(tail[-1])
    except OSError as exc:
        raise EnvError(f"{doing} failed: cannot run {command[0]}: {exc}") from None
    if proc.returncode != 0:
        raise EnvError(f"{doing} failed ({' '.join(command[:4])} ... exited with code "
                       f"{proc.returncode}); its last output:\n" + "\n".join(tail))


def _requirement(text):
    try:
        return Requirement(text)
    except InvalidRequirement as exc:
        raise EnvError(f"requirement {text!r} is not a PEP 508 requirement: {exc}") from None


def _uv_binary():
    """uv's executable, or None where it is missing or ``OPE_ENV_TOOL=pip`` asks for pip."""
    choice = os.environ.get(TOOL_ENV, "auto")
    if choice not in ("auto", "uv", "pip"):
        raise EnvError(f"{TOOL_ENV} must be auto, uv or pip, got {choice!r}")
    if choice == "pip":
        return None
    try:
        import uv
        found = uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
    if found is None and choice == "uv":
        raise EnvError(f"{TOOL_ENV}=uv but uv is not installed (pip install uv)")
    return found


class _Tool:
    """Makes venvs and installs into them with uv where it is installed, else with venv and
    pip; both under one install policy."""

    def __init__(self, policy, log):
        self.policy, self.log = policy, log
        self.uv = _uv_binary()
        self.name = "uv" if self.uv else "pip"

    def venv(self, interpreter, target, doing):
        if self.uv:
            # Relocatable: scripts in bin/ keep working after the staging folder is renamed.
            command = [self.uv, "venv", "--no-config", "--no-python-downloads", "--quiet",
                       "--relocatable", "--python", interpreter, target]
        else:
            command = [interpreter, "-m", "venv", target]
        _run(command, self.log, doing, self.policy.tool_env())

    def install(self, venv_python, args, doing, no_deps=False, locked=False):
        """Install ``args`` into the venv; ``locked``: they are a lock's exact pins, so the
        policy's constraints (already applied by the lock) stay out of hash-checking mode."""
        flags = ["--no-deps"] if no_deps or locked else []
        if self.uv:
            command = [self.uv, "pip", "install", "--python", venv_python,
                       "--no-python-downloads", *self.policy.uv_args(constraints=not locked)]
        else:
            command = [venv_python, "-m", "pip", "install", "--no-input",
                       "--disable-pip-version-check",
                       *self.policy.pip_args(constraints=not locked)]
        _run(command + flags + list(args), self.log, doing, self.policy.tool_env())


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


def _project_copy(root, stage):
    """A copy of the project under ``stage`` to install from. The build runs on a copy: an
    in-tree build would write build/ and *.egg-info into the source, and two builds at once
    would build in the same folder."""
    project = os.path.join(stage, "ope")
    _copy_source(root, project)
    return project


def _runtime_requirements():
    """ope's own install_requires (setup.cfg), less what only the host needs."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(_source_root(), "setup.cfg"))
    lines = parser["options"]["install_requires"].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")
            and canonicalize_name(Requirement(line).name) not in _HOST_ONLY]


def _copy_source(root, target):
    for relative in (*_source_files(root), *_METADATA_FILES):
        os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
        shutil.copy2(os.path.join(root, relative), os.path.join(target, relative))


# -- locks: exact pins for a target Python ----------------------------------------------

def requirement_strings(requires):
    """A package's ``requires`` map (name -> specifier, "python" for the interpreter) as
    PEP 508 strings, without the interpreter's entry."""
    return [f"{name}{specifier}" for name, specifier in sorted(requires.items())
            if name != "python"]


def lock(requires, python_version, *, log=None):
    """Exact pins (``name==version`` with sha256 hashes) of ``requires`` (PEP 508 strings, or
    a package's name -> specifier map) together with ope's own runtime requirements,
    resolved for Python ``python_version`` ("X.Y") under the install policy. Returns the lock
    text: a header naming the Python, then a requirements file.

    Resolved by ``uv pip compile``; without uv by ``pip install --dry-run --report`` for the
    target Python, which is limited to binary wheels and records the hash of the one file
    chosen for this platform. EnvError naming the requirement when nothing satisfies it
    (including what the install policy forbids), or when the index is unreachable."""
    if isinstance(requires, collections.abc.Mapping):
        requires = requirement_strings(requires)
    requires = list(requires)
    for text in requires:
        _requirement(text)
    minor = _minor(python_version)
    policy = load_policy()
    uv = _uv_binary()
    log = log or _LOG.debug
    with tempfile.TemporaryDirectory(prefix="ope-lock-") as stage:
        wanted = os.path.join(stage, "requirements.in")
        with open(wanted, "w") as file:
            file.write("\n".join([*requires, *_runtime_requirements()]) + "\n")
        if uv:
            command = [uv, "pip", "compile", wanted, "--python-version", minor,
                       "--no-python-downloads", "--generate-hashes", "--no-header",
                       "--no-annotate", *policy.uv_args()]
        else:
            report = os.path.join(stage, "report.json")
            command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                       "--ignore-installed", "--report", report, "--python-version", minor,
                       "--only-binary=:all:", "--target", os.path.join(stage, "target"),
                       "--no-input", "--disable-pip-version-check", *policy.pip_args(),
                       "-r", wanted]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S,
                                  env=policy.tool_env(), stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnvError(f"cannot lock {requires} for Python {minor}: {exc}") from None
        log(done.stderr)
        if done.returncode != 0:
            raise _resolution_error(requires, minor, done.stdout + done.stderr, policy)
        pins = done.stdout if uv else _pins_from_report(report)
    return _LOCK_HEADER.format(python=minor) + "\n" + pins


def lock_python(lock_text):
    """The Python version ("X.Y") a lock was resolved for, from its header."""
    match = _LOCK_HEADER_RE.match(lock_text)
    if not match:
        raise EnvError(f"not an ope lock: the first line must be "
                       f"{_LOCK_HEADER.format(python='X.Y')!r}")
    return match.group(1)


def lock_pins(lock_text):
    """The ``name==version`` lines of a lock, without hashes or comments."""
    lines = lock_text.replace("\\\n", " ").splitlines()
    return [line.split()[0] for line in lines
            if line.strip() and not line.lstrip().startswith(("#", "-"))]


def _minor(version):
    match = re.fullmatch(r"(\d+\.\d+)(\.\d+)?", str(version))
    if not match:
        raise EnvError(f"python version must look like 3.10, got {version!r}")
    return match.group(1)


def _pins_from_report(report):
    with open(report) as file:
        installs = json.load(file)["install"]
    lines = []
    for item in sorted(installs, key=lambda item: canonicalize_name(item["metadata"]["name"])):
        line = f"{canonicalize_name(item['metadata']['name'])}=={item['metadata']['version']}"
        digest = item.get("download_info", {}).get("archive_info", {}).get("hashes", {})
        if "sha256" in digest:
            line += f" \\\n    --hash=sha256:{digest['sha256']}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _error_part(output):
    """The tool's error, without the warnings before it."""
    match = re.search(r"^(error|ERROR)\b", output, re.MULTILINE)
    return output[match.start():] if match else output


def _unreachable(output):
    lowered = _error_part(output).lower()
    return any(sign in lowered for sign in _UNREACHABLE_SIGNS)


def _resolution_error(requires, minor, output, policy):
    error = _error_part(output).strip()
    brief = "\n".join(error.splitlines()[-_OUTPUT_TAIL_LINES:])
    settings = (f"configure where packages come from with {', '.join(ENV_VARS)} or [install] "
                f"in {config_path()}")
    if _unreachable(output):
        return EnvError(f"cannot lock for Python {minor}: the package index is unreachable "
                        f"under the install policy ({policy.describe()}); check the network or "
                        f"{settings}. The resolver said:\n{brief}")
    mentioned = {canonicalize_name(word) for word in re.findall(r"[A-Za-z0-9][\w.-]*", error)}
    named = [text for text in requires if canonicalize_name(Requirement(text).name) in mentioned]
    which = ", ".join(repr(text) for text in named) or f"the requirements {requires}"
    return EnvError(f"cannot lock {which} for Python {minor}: no version is available under "
                    f"the install policy ({policy.describe()}), whose constraints may forbid "
                    f"it; change the requirement or {settings}. The resolver said:\n{brief}")


# -- environments built from a lock, shared by every package with that lock ----------------

def ensure_env(lock_text, python_version=None, *, build=True, progress=None):
    """The environment for ``lock_text`` (see :func:`lock`) on Python ``python_version``
    (default: the lock's), building it if there is none and ``build`` is true.

    Environments are keyed by sha256 of (Python version, lock text, ope's source
    fingerprint) and live under ``$OPE_HOME/envs/lock-KEY``, shared by every package with
    the same lock. A build runs under an exclusive file lock (concurrent callers in other
    processes wait for it, then reuse its result), in a staging folder that is renamed into
    place only after the record is written: an interrupted build leaves nothing selectable,
    and the next build removes its remains. ``progress`` gets a line per step with the
    elapsed time (default: log lines on the ``ope.envs`` logger)."""
    minor = _minor(python_version or lock_python(lock_text))
    if python_version is not None and lock_python(lock_text) != minor:
        raise EnvError(f"the lock was resolved for Python {lock_python(lock_text)}, not "
                       f"{python_version}")
    key = hashlib.sha256("\0".join((minor, lock_text, source_fingerprint())).encode())
    key = key.hexdigest()
    name = f"{_LOCKED_PREFIX}{key[:16]}"
    env = _ready(name)
    if env is None:
        if not build:
            raise EnvError(f"the environment for this lock (Python {minor}: "
                           f"{', '.join(lock_pins(lock_text)) or 'ope alone'}) is missing from "
                           f"{_envs_dir()}; pre-build it with: ope env create --from PACKAGE")
        say = _Progress(progress, name)
        with _build_lock(name, say):
            env = _ready(name) or _build_locked(name, key, lock_text, minor, say)
    _touch(env.name)
    return env


class _Progress:
    def __init__(self, progress, name):
        self.progress = progress or (lambda line: _LOG.info("%s", line))
        self.name, self.start = name, time.monotonic()

    def __call__(self, message):
        self.progress(f"env {self.name}: {message} ({time.monotonic() - self.start:.1f} s)")


def _ready(name):
    """The record of environment ``name`` if it is complete and usable, else None."""
    path = os.path.join(_envs_dir(), name, _RECORD)
    if not os.path.isfile(path):
        return None
    env = get(name)
    return env if os.path.isfile(env.python) else None


@contextlib.contextmanager
def _build_lock(name, say=None):
    os.makedirs(_envs_dir(), exist_ok=True)
    fd = os.open(os.path.join(_envs_dir(), f".{name}.lock"), os.O_RDWR | os.O_CREAT |
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


def _build_locked(name, key, lock_text, minor, say):
    target = os.path.join(_envs_dir(), name)
    stage = os.path.join(_envs_dir(), f".stage-{name}")
    # Remains of a build that was killed, or an environment whose interpreter is gone.
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    interpreter = find_python(minor)
    policy = load_policy()
    tool = _Tool(policy, _LOG.debug)
    say(f"building for Python {minor} with {tool.name}")
    try:
        tool.venv(interpreter, stage, f"creating the venv of {name}")
        say("venv created")
        stage_python = os.path.join(stage, "bin", "python")
        lock_file = os.path.join(stage, LOCK_FILE)
        with open(lock_file, "w") as file:
            file.write(lock_text)
        try:
            tool.install(stage_python, ["-r", lock_file], f"installing the lock into {name}",
                         locked=True)
        except EnvError as exc:
            raise _install_error(exc, minor, policy) from exc
        say("locked packages installed")
        with tempfile.TemporaryDirectory(prefix="ope-env-") as copies:
            tool.install(stage_python, [_project_copy(_source_root(), copies)],
                         f"installing ope into {name}", no_deps=True)
        say("ope installed")
        env = _record(name, "locked", os.path.join(target, "bin", "python"),
                      lock_pins(lock_text), ope_source=source_fingerprint(), key=key,
                      probe_python=stage_python)
        missing = check_requirements(
            {Requirement(text).name: str(Requirement(text).specifier)
             for text in _runtime_requirements()}, env.version_of)
        if missing:
            raise EnvError(f"the lock lacks what ope's worker runtime needs ({'; '.join(missing)}); "
                           f"lock the package again with this ope")
        _write_record(env, folder=stage)
        os.rename(stage, target)  # the environment appears whole, record included
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    say("ready")
    return env


def _install_error(exc, minor, policy):
    text = str(exc)
    if _unreachable(text):
        what = ("the package index is unreachable: check the network, or point the install "
                "policy at a reachable index or local folder")
    else:
        what = ("a pinned file is not available from the configured sources (or its hash "
                "differs): lock the package again under this install policy, or configure "
                "the sources it was locked with")
    return EnvError(f"cannot build the environment for Python {minor} from its lock: {what} "
                    f"({policy.describe()}; settings {', '.join(ENV_VARS)} or [install] in "
                    f"{config_path()}). {text}")


# -- use, size and garbage collection -------------------------------------------------------

def _touch(name):
    path = os.path.join(_envs_dir(), name, _LAST_USED)
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


def last_used(env):
    """When environment ``env`` was last selected or ensured (seconds since the epoch)."""
    folder = os.path.join(_envs_dir(), env.name)
    for name in (_LAST_USED, _RECORD):
        try:
            return os.stat(os.path.join(folder, name)).st_mtime
        except FileNotFoundError:
            continue
    return 0.0


def size_on_disk(env):
    """Bytes the environment's folder takes (a registered one: its record only); a file
    hard-linked several times inside it counts once."""
    seen, total = set(), 0
    for here, _, files in os.walk(os.path.join(_envs_dir(), env.name)):
        for name in files:
            try:
                info = os.lstat(os.path.join(here, name))
            except OSError:
                continue
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


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
            with _build_lock(env.name):
                shutil.rmtree(os.path.join(_envs_dir(), env.name))
                os.unlink(os.path.join(_envs_dir(), f".{env.name}.lock"))
        except BlockingIOError:
            continue  # being built or rebuilt right now
        total -= sizes[env.name]
        removed.append(env.name)
    return removed


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
        return _used(get(env))
    failing = check_requirements(package.requires)
    if not failing:
        return None
    candidates = [(f"this host's interpreter {sys.executable}", failing)]
    for candidate in list_envs():
        failing = candidate.failures(package.requires)
        if not failing:
            return _used(candidate)
        candidates.append((f"env {candidate.name!r} (Python {candidate.python_version})",
                           failing))
    listing = "".join(f"\n  {who}: {'; '.join(why)}" for who, why in candidates)
    raise EnvError(f"no worker environment satisfies the requires of package "
                   f"{package.name!r} (environments under {_envs_dir()}):{listing}\n"
                   f"Create one with: ope env create NAME --python X.Y --require ...")


def _used(env):
    """``env``'s interpreter, noting the use for ``ope env gc``."""
    if not os.path.isfile(env.python):
        raise EnvError(f"environment {env.name!r}: its interpreter {env.python} is gone; "
                       f"remove the environment and create it again")
    _touch(env.name)
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
