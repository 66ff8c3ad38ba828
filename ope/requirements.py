"""Does the running environment satisfy a package's ``requires``?

``requires`` maps a distribution name, or ``"python"`` for the interpreter, to a PEP 440
version specifier; ``""`` means "installed, any version". Specifiers and versions are parsed
with ``packaging``, the implementation pip itself uses, so a local build such as
``2.13.0+cpu`` satisfies ``<2.14`` exactly as pip would decide. The out-of-process mode uses
the same check to pick a worker environment that can run a package.

A few frameworks ship one importable module under several distribution names (TensorFlow as
``tensorflow``, ``tensorflow-cpu``, ...): a requirement on the module's usual name is met by
any of them (:data:`PROVIDERS`).
"""

import importlib.metadata
import platform

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion

from ope.errors import PackageError, RequirementError

__all__ = ["parse_specifier", "installed_version", "check_requirements", "ensure_requirements",
           "PROVIDERS"]

# requirement name -> the distributions that provide it, first the one of that name
PROVIDERS = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-intel",
                            "tensorflow-macos")}


def parse_specifier(name, specifier):
    """``specifier`` as a SpecifierSet; PackageError naming the requirement if invalid."""
    if not isinstance(specifier, str):
        raise PackageError(f"requirement {name!r}: specifier must be a string, got {specifier!r}")
    try:
        return SpecifierSet(specifier)
    except InvalidSpecifier:
        raise PackageError(f"requirement {name!r}: {specifier!r} is not a PEP 440 version "
                           f"specifier (e.g. '>=1.2,<2')") from None


def installed_version(name):
    """Version of distribution ``name`` (or of the interpreter for "python"), None if absent."""
    if name == "python":
        return platform.python_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_requirements(requires, versions=None):
    """Every requirement in ``requires`` that ``versions`` (name -> installed version or None;
    default: this process) does not satisfy, as readable strings. Empty means satisfied."""
    versions = versions or installed_version
    failures = []
    for name, specifier in requires.items():
        wanted = parse_specifier(name, specifier)
        found = next(filter(None, map(versions, PROVIDERS.get(name, (name,)))), None)
        label = f"{name}{specifier}" if specifier else f"{name} (any version)"
        if found is None:
            failures.append(f"{label}: not installed")
            continue
        try:
            satisfied = wanted.contains(found, prereleases=True)
        except InvalidVersion:
            satisfied = False
        if not satisfied:
            failures.append(f"{label}: found {found}")
    return failures


def ensure_requirements(package, *, hint=""):
    """Raise RequirementError listing every requirement of ``package`` this process fails."""
    failures = check_requirements(package.requires)
    if failures:
        message = (f"package {package.name!r} requires what this process does not have: "
                   + "; ".join(failures))
        raise RequirementError(message + (f". {hint}" if hint else ""))
