"""Where environment builds take packages from: the install policy.

Design idea: ope knows nothing of any one machine. Which package index, extra indexes,
find-links folders and constraints files a lock or an environment build may use is
configuration, read once per build into an :class:`InstallPolicy` and passed to uv and to pip
alike as explicit command-line arguments (:meth:`InstallPolicy.uv_args`,
:meth:`InstallPolicy.pip_args`). Both tools then run with their own configuration switched
off (uv ``--no-config``, pip ``PIP_CONFIG_FILE=/dev/null``, and their policy environment
variables removed), so a build uses exactly the policy, whichever tool runs it.

Each setting is taken from the first of these that sets it:

1. an environment variable: ``OPE_INDEX_URL`` (one URL), ``OPE_EXTRA_INDEX_URLS``
   (whitespace-separated URLs), ``OPE_FIND_LINKS`` and ``OPE_CONSTRAINTS`` (paths or URLs,
   separated by ``os.pathsep``); set but empty means "none";
2. the ``[install]`` table of ope's configuration file, ``$OPE_CONFIG`` or else
   ``$OPE_HOME/config.toml``::

       [install]
       index-url = "https://pypi.example.org/simple"
       extra-index-urls = ["file:///opt/pypi/simple"]
       find-links = ["/opt/wheels"]
       constraints = ["constraints.txt"]   # relative paths: to the configuration file

3. pip's own configuration, as ``python -m pip config list`` reports it: ``PIP_INDEX_URL``,
   ``PIP_EXTRA_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_CONSTRAINT`` and the ``index-url``,
   ``extra-index-url``, ``find-links`` and ``constraint`` of pip.conf files. So with nothing
   configured for ope, an environment gets what ``pip install`` would get on this machine.

Unset everywhere: the tools' default index (PyPI), nothing else.

A constraint binds every package a resolution touches, including dependencies, and may carry
an environment marker. That is how a machine keeps a package to a local build: for example
``torch==2.13.0 ; python_version == "3.11"`` with ``torch<0 ; python_version != "3.11"``
makes any torch requirement on another Python unsatisfiable (an EnvError naming torch)
instead of a download from the registry.

With extra indexes, uv is told ``--index-strategy unsafe-best-match``: pip's behaviour of
choosing the best version across all indexes (uv's default stops at the first index that
knows a package, which on a local mirror holding one platform's wheels finds none for
another Python).
"""

import dataclasses
import os
import subprocess
import sys

from ope.errors import EnvError

__all__ = ["InstallPolicy", "load_policy", "ENV_VARS", "CONFIG_ENV", "HOME_ENV", "ope_home",
           "config_path"]

HOME_ENV = "OPE_HOME"
CONFIG_ENV = "OPE_CONFIG"
# setting -> (ope environment variable, config.toml key, pip's key, how the variable splits)
_SETTINGS = {
    "index_url": ("OPE_INDEX_URL", "index-url", "index-url", None),
    "extra_index_urls": ("OPE_EXTRA_INDEX_URLS", "extra-index-urls", "extra-index-url", "space"),
    "find_links": ("OPE_FIND_LINKS", "find-links", "find-links", "pathsep"),
    "constraints": ("OPE_CONSTRAINTS", "constraints", "constraint", "pathsep"),
}
ENV_VARS = tuple(variable for variable, *_ in _SETTINGS.values())
# The tools' own variables for the same settings: removed from their environment so that
# only the policy applies.
_PIP_VARS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT",
             "PIP_NO_INDEX")
_UV_VARS = ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL",
            "UV_FIND_LINKS", "UV_CONSTRAINT", "UV_BUILD_CONSTRAINT", "UV_NO_INDEX",
            "UV_INDEX_STRATEGY", "UV_CONFIG_FILE")


@dataclasses.dataclass(frozen=True)
class InstallPolicy:
    """Where packages come from; ``sources`` says, per setting, where its value was read."""

    index_url: str = None
    extra_index_urls: tuple = ()
    find_links: tuple = ()
    constraints: tuple = ()
    sources: dict = dataclasses.field(default_factory=dict, compare=False)

    def uv_args(self, constraints=True):
        """Arguments of ``uv pip compile|install`` that apply this policy (``constraints``
        false: its sources alone, for installing a lock, whose pins already obey them)."""
        args = ["--no-config"]
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        if self.extra_index_urls:
            args += ["--index-strategy", "unsafe-best-match"]
        for link in self.find_links:
            args += ["--find-links", link]
        for path in self.constraints if constraints else ():
            args += ["--constraint", path]
        return args

    def pip_args(self, constraints=True):
        """Arguments of ``pip install`` that apply this policy (``constraints``: as for
        :meth:`uv_args`)."""
        args = []
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        for path in self.constraints if constraints else ():
            args += ["--constraint", path]
        return args

    def tool_env(self):
        """The environment to run uv or pip in: this one without the tools' own policy
        settings, and with pip's configuration files off."""
        env = {key: value for key, value in os.environ.items()
               if key not in _PIP_VARS and key not in _UV_VARS}
        env["PIP_CONFIG_FILE"] = os.devnull
        return env

    def describe(self):
        """One line for error messages: each setting and where it came from."""
        parts = [f"index {self.index_url or 'default (PyPI)'}"]
        for label, value in (("extra indexes", self.extra_index_urls),
                             ("find-links", self.find_links),
                             ("constraints", self.constraints)):
            if value:
                parts.append(f"{label} {' '.join(value)}")
        origins = sorted(set(self.sources.values()))
        return "; ".join(parts) + (f" (from {', '.join(origins)})" if origins else "")


def ope_home():
    """Where ope keeps its environments and configuration: ``$OPE_HOME``, default
    ``~/.cache/ope`` (``$XDG_CACHE_HOME/ope`` where that is set)."""
    home = os.environ.get(HOME_ENV)
    if home:
        return os.path.abspath(os.path.expanduser(home))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ope")


def config_path():
    """The configuration file: ``$OPE_CONFIG``, else ``$OPE_HOME/config.toml``."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    return os.path.join(ope_home(), "config.toml")


def load_policy(pip_python=None):
    """The policy in force now (see the module docstring). ``pip_python``: the interpreter
    whose pip configuration is the fallback (default this one)."""
    config = _read_config()
    pip_config = None
    values, sources = {}, {}
    for setting, (variable, key, pip_key, split) in _SETTINGS.items():
        if variable in os.environ:
            values[setting] = _split(os.environ[variable], split)
            sources[setting] = variable
        elif key in config:
            values[setting] = _from_config(config, key, split)
            sources[setting] = config_path()
        else:
            if pip_config is None:
                pip_config = _pip_config(pip_python or sys.executable)
            if pip_key in pip_config:
                values[setting] = _split(pip_config[pip_key], split and "space")
                sources[setting] = "pip config"
    if "index_url" in values:
        values["index_url"] = values["index_url"] or None
    return InstallPolicy(**values, sources=sources)


def _split(text, how):
    if how is None:
        return text.strip()
    parts = text.split() if how == "space" else text.split(os.pathsep)
    return tuple(part.strip() for part in parts if part.strip())


def _read_config():
    path = config_path()
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise EnvError(f"cannot read ope's configuration {path}: {exc}") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the configuration needs 3.11's tomllib
        raise EnvError(f"reading {path} needs Python 3.11 or later (tomllib); set the OPE_* "
                       f"variables instead") from None
    try:
        table = tomllib.loads(data.decode()).get("install", {})
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EnvError(f"ope's configuration {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(table) - {key for _, key, _, _ in _SETTINGS.values()})
    if unknown:
        raise EnvError(f"{path}: unknown [install] setting(s) {', '.join(unknown)}; known: "
                       f"{', '.join(key for _, key, _, _ in _SETTINGS.values())}")
    return table


def _from_config(config, key, split):
    value = config[key]
    if split is None:
        if not isinstance(value, str):
            raise EnvError(f"{config_path()}: [install] {key} must be a string")
        return value
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise EnvError(f"{config_path()}: [install] {key} must be a list of strings")
    if key in ("find-links", "constraints"):
        base = os.path.dirname(config_path())
        value = [item if "://" in item else os.path.join(base, os.path.expanduser(item))
                 for item in value]
    return tuple(value)


def _pip_config(python):
    """pip's configured values, environment variables over files as pip applies them."""
    try:
        done = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if done.returncode != 0:
        return {}  # no pip there: nothing configured through it
    ranked = {}
    # pip lists "section.key='value'", with ":env:" for its environment variables; these win,
    # then the "install" section over "global", as in pip itself.
    rank = {":env:": 0, "install": 1, "global": 2}
    for line in done.stdout.splitlines():
        name, sep, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if not sep or section not in rank:
            continue
        value = value.strip().strip("'\"")
        if key not in ranked or rank[section] < ranked[key][0]:
            ranked[key] = (rank[section], value)
    return {key: value for key, (_, value) in ranked.items()}
