"""Building environments: the tools (uv, else venv and pip), named environments from
requirements, locks for a target Python, and environments built from a lock once, under a
file lock, and renamed into place (the design: ope/envs/__init__.py)."""

import collections
import collections.abc
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
import time

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ope.errors import EnvError
from ope.install_policy import ENV_VARS, config_path, load_policy
from ope.package.format import LOCK_FILE
from ope.requirements import check_requirements
from ope.envs.progress import BUILD_STEPS
from ope.envs.source import project_copy, runtime_requirements, source_fingerprint, source_root
from ope.envs.store import (LOCKED_PREFIX, LOG, RECORD, Env, build_lock, env_dir, envs_dir,
                            find_python, get, interpreter_at, probe, touch,
                            wheel_folder)

TOOL_ENV = "OPE_ENV_TOOL"
_LOCK_HEADER = "# ope lock for Python {python}"
_LOCK_HEADER_RE = re.compile(r"# ope lock for Python (\d+\.\d+)\n")
TOOL_TIMEOUT_S = 600
# Lower-cased fragments of uv's and pip's errors when the index cannot be reached at all.
_UNREACHABLE_SIGNS = ("failed to fetch", "error sending request", "dns error",
                      "connection refused", "could not fetch url", "network is unreachable",
                      "failed to establish a new connection", "name or service not known",
                      "temporary failure in name resolution", "max retries exceeded")
OUTPUT_TAIL_LINES = 30


# -- creating and registering -------------------------------------------------------------

def create(name, python=None, requires=(), log=print):
    """Create environment ``name``: a venv of interpreter ``python`` (see :func:`find_python`;
    default this host's) with this project and ``requires`` (PEP 508 strings such as
    "numpy<2") installed under the install policy (ope.install_policy). Each line the
    installer prints goes to ``log`` as it comes. Returns the record; on failure nothing is
    left behind and EnvError names the cause."""
    target = env_dir(name)
    interpreter = find_python(python)
    requires = list(requires)
    for text in requires:
        parse_requirement(text)
    os.makedirs(envs_dir(), exist_ok=True)
    try:
        os.mkdir(target)  # claims the name: two creates of one name cannot both proceed
    except FileExistsError:
        raise EnvError(f"environment {name!r} already exists at {target}; remove it first "
                       f"(ope env remove {name})") from None
    try:
        tool = Tool(load_policy(), log)
        tool.venv(interpreter, target, f"creating the venv of {name!r}")
        venv_python = os.path.join(target, "bin", "python")
        tool.install(venv_python, [tool.ope_wheel(venv_python), *requires],
                     f"installing ope and {requires or 'nothing else'} into {name!r}")
        return write_record(new_record(name, "created", venv_python, requires,
                                     ope_source=source_fingerprint()))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def register(name, path):
    """Record an existing interpreter or venv (which must have ope installed) as ``name``."""
    target = env_dir(name)
    python = interpreter_at(path)
    env = new_record(name, "registered", python, [])
    if not env.ope_version:
        raise EnvError(f"{python} has no ope installed, so it cannot run a worker: install "
                       f"this project into it (pip install /path/to/ope) or use ope env create")
    try:
        os.makedirs(target)
    except FileExistsError:
        raise EnvError(f"environment {name!r} already exists at {target}") from None
    return write_record(env)


def new_record(name, kind, python, requires, ope_source=None, key=None, probe_python=None):
    facts = probe(probe_python or python)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Env(name=name, kind=kind, python=python, python_version=facts["python_version"],
               packages=facts["packages"], requires=requires, created=created,
               ope_version=facts["packages"].get("ope"), ope_source=ope_source, key=key)


def write_record(env, folder=None):
    path = os.path.join(folder or env_dir(env.name), RECORD)
    with open(path + ".tmp", "w") as file:
        json.dump(dataclasses.asdict(env), file, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)  # a reader sees the whole record or none
    return env


def run_tool(command, log, doing, env=None):
    """Run ``command``, passing each output line to ``log``; EnvError with the last lines
    if it fails."""
    tail = collections.deque(maxlen=OUTPUT_TAIL_LINES)
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


def parse_requirement(text):
    try:
        return Requirement(text)
    except InvalidRequirement as exc:
        raise EnvError(f"requirement {text!r} is not a PEP 508 requirement: {exc}") from None


def uv_binary():
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


class Tool:
    """Makes venvs and installs into them with uv where it is installed, else with venv and
    pip; both under one install policy."""

    def __init__(self, policy, log):
        self.policy, self.log = policy, log
        self.uv = uv_binary()
        self.name = "uv" if self.uv else "pip"

    def venv(self, interpreter, target, doing):
        if self.uv:
            # Relocatable: scripts in bin/ keep working after the staging folder is renamed.
            command = [self.uv, "venv", "--no-config", "--no-python-downloads", "--quiet",
                       "--relocatable", "--python", interpreter, target]
        else:
            command = [interpreter, "-m", "venv", target]
        run_tool(command, self.log, doing, self.policy.tool_env())

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
        run_tool(command + flags + list(args), self.log, doing, self.policy.tool_env())

    def ope_wheel(self, venv_python):
        """This project as a wheel for the venv's Python, built once per Python version and
        source fingerprint (``$OPE_HOME/wheels``): compiling ope_native is most of an
        environment's build time, and every environment of one Python shares the result."""
        version = subprocess.run([venv_python, "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, check=True).stdout.split()
        folder = wheel_folder(".".join(version))
        wheels = glob.glob(os.path.join(folder, "*.whl"))
        if wheels:
            return wheels[0]
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=os.path.dirname(folder)) as stage:
            project = project_copy(source_root(), stage)
            built = os.path.join(stage, "dist")
            if self.uv:
                command = [self.uv, "build", "--wheel", "--quiet", "--no-python-downloads",
                           "--python", venv_python, "--out-dir", built,
                           *self.policy.uv_args(constraints=False), project]
            else:
                command = [venv_python, "-m", "pip", "wheel", "--no-deps", "--no-input",
                           "--disable-pip-version-check", "--wheel-dir", built,
                           *self.policy.pip_args(constraints=False), project]
            run_tool(command, self.log, "building ope's wheel", self.policy.tool_env())
            try:
                os.rename(built, folder)  # whole or not at all; a racing build may win
            except OSError:
                pass
        return glob.glob(os.path.join(folder, "*.whl"))[0]


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
        parse_requirement(text)
    minor = _minor(python_version)
    policy = load_policy()
    uv = uv_binary()
    log = log or LOG.debug
    with tempfile.TemporaryDirectory(prefix="ope-lock-") as stage:
        wanted = os.path.join(stage, "requirements.in")
        with open(wanted, "w") as file:
            file.write("\n".join([*requires, *runtime_requirements()]) + "\n")
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
            done = subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
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
    brief = "\n".join(error.splitlines()[-OUTPUT_TAIL_LINES:])
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
    minor, key, name = _locked_name(lock_text, python_version)
    env = _ready(name)
    if env is None:
        if not build:
            raise EnvError(f"the environment for this lock (Python {minor}: "
                           f"{', '.join(lock_pins(lock_text)) or 'ope alone'}) is missing from "
                           f"{envs_dir()}; pre-build it with: ope env create --from PACKAGE")
        say = _Progress(progress, name)
        with build_lock(name, say):
            env = _ready(name) or _build_locked(name, key, lock_text, minor, say)
    touch(env.name)
    return env


def locked_env(lock_text):
    """The environment built for ``lock_text`` if it exists and is complete, else None."""
    return _ready(_locked_name(lock_text)[2])


def _locked_name(lock_text, python_version=None):
    """(Python "X.Y", key, environment name) of the environment of a lock."""
    minor = _minor(python_version or lock_python(lock_text))
    if python_version is not None and lock_python(lock_text) != minor:
        raise EnvError(f"the lock was resolved for Python {lock_python(lock_text)}, not "
                       f"{python_version}")
    key = hashlib.sha256("\0".join((minor, lock_text, source_fingerprint())).encode())
    key = key.hexdigest()
    return minor, key, f"{LOCKED_PREFIX}{key[:16]}"


class _Progress:
    def __init__(self, progress, name):
        self.progress = progress or (lambda line: LOG.info("%s", line))
        self.name, self.start = name, time.monotonic()

    def __call__(self, message):
        self.progress(f"env {self.name}: {message} ({time.monotonic() - self.start:.1f} s)")


def _ready(name):
    """The record of environment ``name`` if it is complete and usable, else None."""
    path = os.path.join(envs_dir(), name, RECORD)
    if not os.path.isfile(path):
        return None
    env = get(name)
    return env if os.path.isfile(env.python) else None


def _build_locked(name, key, lock_text, minor, say):
    target = os.path.join(envs_dir(), name)
    stage = os.path.join(envs_dir(), f".stage-{name}")
    # Remains of a build that was killed, or an environment whose interpreter is gone.
    shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    interpreter = find_python(minor)
    policy = load_policy()
    tool = Tool(policy, LOG.debug)
    say(f"{BUILD_STEPS[0]} for Python {minor} with {tool.name}")
    try:
        tool.venv(interpreter, stage, f"creating the venv of {name}")
        say(BUILD_STEPS[1])
        stage_python = os.path.join(stage, "bin", "python")
        lock_file = os.path.join(stage, LOCK_FILE)
        with open(lock_file, "w") as file:
            file.write(lock_text)
        try:
            tool.install(stage_python, ["-r", lock_file], f"installing the lock into {name}",
                         locked=True)
        except EnvError as exc:
            raise _install_error(exc, minor, policy) from exc
        say(BUILD_STEPS[2])
        tool.install(stage_python, [tool.ope_wheel(stage_python)], f"installing ope into {name}",
                     no_deps=True)
        say(BUILD_STEPS[3])
        env = new_record(name, "locked", os.path.join(target, "bin", "python"),
                      lock_pins(lock_text), ope_source=source_fingerprint(), key=key,
                      probe_python=stage_python)
        missing = check_requirements(
            {Requirement(text).name: str(Requirement(text).specifier)
             for text in runtime_requirements()}, env.version_of)
        if missing:
            raise EnvError(f"the lock lacks what ope's worker runtime needs ({'; '.join(missing)}); "
                           f"lock the package again with this ope")
        write_record(env, folder=stage)
        os.rename(stage, target)  # the environment appears whole, record included
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    say(BUILD_STEPS[4])
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
