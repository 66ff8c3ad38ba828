"""This project's source as the worker runtime that environments are built with: its files, its
fingerprint, and its own requirements."""

import configparser
import hashlib
import os
import shutil

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ope.errors import EnvError

# uv is what builds environments; a worker never runs it, so no environment gets a copy.
_HOST_ONLY = ("uv",)
_SOURCE_DIRS = ("ope", "workers", "ope_native")
_SOURCE_SUFFIXES = (".py", ".c", ".h")
_BUILD_FILES = ("setup.py", "setup.cfg", "pyproject.toml")
_METADATA_FILES = ("README.md",)  # the build reads it (long_description); not in the fingerprint


# -- this project's source ------------------------------------------------------------------

def source_root():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    root = source_root()
    digest = hashlib.sha256()
    for relative in _source_files(root):
        digest.update(relative.encode() + b"\0")
        with open(os.path.join(root, relative), "rb") as file:
            digest.update(file.read() + b"\0")
    return digest.hexdigest()


def project_copy(root, stage):
    """A copy of the project under ``stage`` to install from. The build runs on a copy: an
    in-tree build would write build/ and *.egg-info into the source, and two builds at once
    would build in the same folder."""
    project = os.path.join(stage, "ope")
    copy_source(root, project)
    return project


def runtime_requirements():
    """ope's own install_requires (setup.cfg), less what only the host needs."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(source_root(), "setup.cfg"))
    lines = parser["options"]["install_requires"].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")
            and canonicalize_name(Requirement(line).name) not in _HOST_ONLY]


def copy_source(root, target):
    for relative in (*_source_files(root), *_METADATA_FILES):
        os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
        shutil.copy2(os.path.join(root, relative), os.path.join(target, relative))
