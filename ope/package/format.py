"""Model packages: one folder with everything needed to run a model, verifiable on load.

Layout of a package folder::

    config.json     {"format": "ope-package", "format_version": 1, "name", "runner",
                     "inputs": [spec dicts], "outputs": [spec dicts], "requires": {name: specifier},
                     "test_data": bool, optional "python": "X.Y" (the Python it is locked
                     for; then requires["python"] is "==X.Y.*"), plus per runner:
                       torchscript, onnx: "model_file";  python: "entrypoint", "framework";
                       torch_export: "model_file", "positional_inputs", "aot", "aot_device";
                       torch_package: "model_file", "package_name", "resource";
                       keras: "model_file", "backend";
                       tensorflow: "saved_model_dir", "signature"}
    manifest.json   {"algorithm": "sha256", "files": {relative path: hex digest}}
                    covering every other file, config.json included
    model.pt        torchscript: the scripted module (torch.jit.save)
    model.pt2       torch_export: the program (torch.export.save) or, with "aot", its
                    AOTInductor package
    model.package   torch_package: the torch.package archive
    model.onnx      onnx: the ONNX model (model.onnx.data beside it if its weights are external)
    code/           python: a copy of code_dir; the entrypoint is imported from here
    model.keras     keras: the model file (model.save)
    saved_model/    tensorflow: the SavedModel folder
    data/           python, optional: a copy of data_dir, handed to the factory
    test_data/      optional: inputs.npz and outputs.npz for the self-check
    requirements.lock  optional: ``requires`` resolved to exact pins with hashes for one
                    Python (ope.envs.lock writes it): what a worker environment built for
                    this package installs

Design idea: a package that exists on disk is complete and has passed its own test (build.py
writes it beside its destination and renames it into place). Reading checks the format
version, then the manifest both ways (no missing, extra or changed file) before anything in
the folder is parsed or executed. A package holds regular files and folders only: a symbolic
link anywhere in it is refused, since the manifest cannot vouch for what it points to (a
linked folder in code/ would even shadow a verified module). A python package's entrypoint
must be a module of its own code/, so it runs only the code its manifest verified.

A package read once is pinned by its manifest's digest (the sha256 of manifest.json's bytes,
which name every other file's sha256): whoever reads the folder again for the same model (a
worker, each time it starts) passes the digest to :func:`read_package`, which refuses a
folder that a deployment has changed since, instead of serving another model under its name.
"""

import hashlib
import json
import os
import re

import numpy as np

from ope.errors import PackageError, SpecError
from ope.spec import TensorSpec, as_specs

__all__ = ["FORMAT", "FORMAT_VERSION", "RUNNERS", "FRAMEWORKS", "LOCK_FILE", "Package",
           "read_package", "python_requirement"]

FORMAT = "ope-package"
FORMAT_VERSION = 1
RUNNERS = ("torchscript", "python", "placeholder", "torch_export", "torch_package", "onnx",
           "keras", "tensorflow")
FRAMEWORKS = ("numpy", "torch")

_CONFIG = "config.json"
_MANIFEST = "manifest.json"
# The model file of each runner that has one.
MODEL_FILES = {"torchscript": "model.pt", "torch_export": "model.pt2",
               "torch_package": "model.package", "onnx": "model.onnx", "keras": "model.keras"}
_SAVED_MODEL_DIR = "saved_model"
_CODE_DIR = "code"
_DATA_DIR = "data"
_TEST_INPUTS = "test_data/inputs.npz"
_TEST_OUTPUTS = "test_data/outputs.npz"
LOCK_FILE = "requirements.lock"
_PYTHON_VERSION = re.compile(r"3\.\d+")


class Package:
    """Read-only view of a verified package on disk. Obtain one with :func:`read_package`."""

    def __init__(self, path, config, inputs, outputs, files, manifest_digest):
        self.path = path
        self.config = config  # the raw config.json, already checked by _parse_specs
        self.files = files  # relative path -> sha256 hex digest, from the manifest
        self.manifest_digest = manifest_digest  # sha256 hex digest of manifest.json's bytes
        self.name = config["name"]
        self.runner = config["runner"]
        self.inputs = inputs
        self.outputs = outputs
        self.requires = config["requires"]
        self.output_names = tuple(spec.name for spec in outputs)

    def __repr__(self):
        return f"Package(name={self.name!r}, runner={self.runner!r}, path={self.path!r})"

    @property
    def model_file(self):
        """Absolute path of the model file (the runners of MODEL_FILES)."""
        return os.path.join(self.path, self.config["model_file"])

    @property
    def saved_model_dir(self):
        """Absolute path of the SavedModel folder (tensorflow packages)."""
        return os.path.join(self.path, self.config["saved_model_dir"])

    @property
    def code_dir(self):
        """Absolute path of the copied code (python packages)."""
        return os.path.join(self.path, _CODE_DIR)

    @property
    def code_modules(self):
        """Names of the top-level modules and packages in code/ (python packages)."""
        return _code_modules(self.files)

    @property
    def data_dir(self):
        """Absolute path of the copied data, or None if the package has none."""
        prefix = _DATA_DIR + "/"
        has_data = any(name.startswith(prefix) for name in self.files)
        return os.path.join(self.path, _DATA_DIR) if has_data else None

    @property
    def entrypoint(self):
        return self.config.get("entrypoint")

    @property
    def framework(self):
        return self.config.get("framework")

    @property
    def python(self):
        """The Python version ("X.Y") the package is made for, or None if any."""
        return self.config.get("python")

    def lock_text(self):
        """The package's lock (its requirements pinned for one Python), or None if it has
        none. The manifest verified it when the package was read."""
        if LOCK_FILE not in self.files:
            return None
        with open(os.path.join(self.path, LOCK_FILE), encoding="utf-8") as file:
            return file.read()

    @property
    def has_test_data(self):
        return self.config["test_data"]

    def test_inputs(self):
        """The stored self-check inputs as a dict of arrays, or None."""
        return self._load_npz(_TEST_INPUTS)

    def test_outputs(self):
        """The stored expected outputs as a dict of arrays, or None."""
        return self._load_npz(_TEST_OUTPUTS)

    def _load_npz(self, relative):
        if not self.has_test_data:
            return None
        with np.load(os.path.join(self.path, relative), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}


# --- reading ------------------------------------------------------------------------------

def read_package(path, *, manifest_digest=None):
    """Open and verify the package at ``path``; PackageError on anything wrong with it.
    ``manifest_digest``: the :attr:`Package.manifest_digest` of an earlier read of this
    package, which the folder must still have (PackageError if it changed on disk)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise PackageError(f"no model package at {path} (not a directory)")
    config_bytes = _read_file(path, _CONFIG)
    config = _parse_json(path, _CONFIG, config_bytes)
    _check_format(path, config)
    manifest_bytes = _read_file(path, _MANIFEST)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if manifest_digest is not None and digest != manifest_digest:
        raise PackageError(f"package at {path} changed on disk since it was loaded (manifest "
                           f"digest: expected {manifest_digest[:16]}..., found {digest[:16]}...); "
                           f"load it again to serve the new version")
    # config.json is checked by the bytes parsed above, not read again: what is verified is
    # what is used, even if the file changes meanwhile.
    files = _verify_manifest(path, _parse_json(path, _MANIFEST, manifest_bytes),
                             {_CONFIG: config_bytes})
    package = Package(path, config, *_parse_specs(path, config), files, digest)
    if package.runner == "python":
        problem = _foreign_entrypoint(package.entrypoint, package.code_modules,
                                      f"the package's {_CODE_DIR}/")
        if problem:
            raise PackageError(f"package {path}: {_CONFIG}: {problem}")
    return package


def _read_file(path, relative):
    try:
        with open(os.path.join(path, relative), "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise PackageError(f"package {path}: {relative} is missing") from None
    except OSError as error:
        raise PackageError(f"package {path}: cannot read {relative} ({error})") from None


def _parse_json(path, relative, data):
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PackageError(f"package {path}: {relative} is not valid JSON ({error})") from None


def _check_format(path, config):
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PackageError(f"package {path}: {_CONFIG} is not an ope package config "
                           f"(expected \"format\": \"{FORMAT}\")")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"package {path}: format version {version!r} is not supported "
                           f"(this ope reads version {FORMAT_VERSION})")


def _verify_manifest(path, manifest, already_read):
    """The manifest's files, after checking the folder against them; ``already_read``:
    relative path -> the bytes of a file read before, hashed instead of reading it again."""
    if not isinstance(manifest, dict) or manifest.get("algorithm") != "sha256" \
            or not isinstance(manifest.get("files"), dict):
        raise PackageError(f"package {path}: {_MANIFEST} is malformed")
    expected = manifest["files"]
    present = set(_list_files(path))
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing:
        raise PackageError(f"package {path}: missing file(s) {', '.join(missing)}")
    if extra:
        raise PackageError(f"package {path}: unexpected file(s) {', '.join(extra)} "
                           f"(not in {_MANIFEST})")
    for relative in sorted(expected):
        if relative in already_read:
            digest = hashlib.sha256(already_read[relative]).hexdigest()
        else:
            try:
                digest = _sha256(os.path.join(path, relative))
            except OSError as error:  # changed since it was listed
                raise PackageError(f"package {path}: cannot read {relative} ({error})") from None
        if digest != expected[relative]:
            raise PackageError(f"package {path}: hash mismatch for {relative} (manifest "
                               f"{str(expected[relative])[:12]}..., file {digest[:12]}...)")
    return dict(expected)


def _list_files(path):
    """Every file of the package folder ``path`` as a relative posix path, except the manifest
    itself; PackageError for a link or another thing a package cannot hold (_walk)."""
    return [relative for relative in _walk(path, f"package {path}") if relative != _MANIFEST]


def _walk(root, where):
    """Every file under ``root`` as a relative posix path. PackageError, naming ``where`` and
    the entry, for a symbolic link (to a file or a folder) or anything else that is not a
    regular file or folder, and for a folder that cannot be listed."""
    folders = [""]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(os.path.join(root, folder)) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            raise PackageError(f"{where}: cannot list {folder or '.'} ({error})") from None
        for entry in entries:
            relative = folder + entry.name
            if entry.is_symlink():
                raise PackageError(f"{where}: {relative} is a symbolic link; a package holds "
                                   f"no links, since its manifest cannot vouch for what they "
                                   f"point to (copy the target in instead)")
            if entry.is_dir(follow_symlinks=False):
                folders.append(relative + "/")
            elif entry.is_file(follow_symlinks=False):
                yield relative
            else:
                raise PackageError(f"{where}: {relative} is not a regular file or folder")


def _code_modules(files):
    """The top-level module and package names that ``files`` (relative paths in a package)
    put in code/: what an import from code/ can find there."""
    names = set()
    prefix = _CODE_DIR + "/"
    for relative in files:
        if relative.startswith(prefix):
            entry, in_folder, _ = relative[len(prefix):].partition("/")
            if in_folder or entry.endswith((".py", ".so")):
                names.add(entry.partition(".")[0])
    return names


def _foreign_entrypoint(entrypoint, modules, where):
    """Why ``entrypoint`` does not name a module of ``modules`` (the top-level names in
    ``where``), or None if it does."""
    top = entrypoint.partition(":")[0].partition(".")[0]
    if top in modules:
        return None
    return (f"entrypoint {entrypoint!r}: module {top!r} is not in {where} (a package runs "
            f"only its own code)")


def _sha256(filename):
    digest = hashlib.sha256()  # not hashlib.file_digest: workers may run Python 3.10
    # O_NOFOLLOW: a file replaced by a link after it was listed is not followed either.
    with open(os.open(filename, os.O_RDONLY | os.O_NOFOLLOW), "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_specs(path, config):
    """Check every field of the config; return its (inputs, outputs) as TensorSpec tuples.
    PackageError if a field is missing or wrong."""
    def fail(message):
        raise PackageError(f"package {path}: {_CONFIG}: {message}")

    specs = {}
    if not isinstance(config.get("name"), str) or not config["name"]:
        fail("'name' must be a non-empty string")
    if config.get("runner") not in RUNNERS:
        fail(f"'runner' must be one of {', '.join(RUNNERS)}, got {config.get('runner')!r}")
    try:
        for role in ("inputs", "outputs"):
            if not isinstance(config.get(role), list):
                fail(f"'{role}' must be a list of tensor specs")
            specs[role] = as_specs((TensorSpec.from_dict(d) for d in config[role]), role[:-1])
    except SpecError as error:
        fail(str(error))
    requires = config.get("requires")
    if not isinstance(requires, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in requires.items()):
        fail("'requires' must map names to version specifier strings")
    if not isinstance(config.get("test_data"), bool):
        fail("'test_data' must be true or false")
    if "python" in config and (not isinstance(config["python"], str)
                               or python_requirement(config["python"]) != requires.get("python")):
        fail("'python' must be a version such as \"3.10\", with requires[\"python\"] "
             "\"==3.10.*\"")
    model_file = MODEL_FILES.get(config["runner"])
    if model_file and config.get("model_file") != model_file:
        fail(f"'model_file' must be {model_file!r} for a {config['runner']} package")
    if config["runner"] == "torch_export":
        _check_torch_export_fields(config, fail)
    if config["runner"] == "torch_package" and not all(
            isinstance(config.get(key), str) and config[key]
            for key in ("package_name", "resource")):
        fail("'package_name' and 'resource' must be non-empty strings")
    if config["runner"] == "keras" and not isinstance(config.get("backend"), str):
        fail("'backend' must name the Keras backend")
    if config["runner"] == "tensorflow" and config.get("saved_model_dir") != _SAVED_MODEL_DIR:
        fail(f"'saved_model_dir' must be {_SAVED_MODEL_DIR!r} for a tensorflow package")
    if config["runner"] == "tensorflow" and not isinstance(config.get("signature"), str):
        fail("'signature' must name the SavedModel's signature")
    if config["runner"] == "python":
        problem = _entrypoint_problem(config.get("entrypoint"))
        if problem:
            fail(problem)
        if config.get("framework") not in FRAMEWORKS:
            fail(f"'framework' must be one of {', '.join(FRAMEWORKS)}, "
                 f"got {config.get('framework')!r}")
    return specs["inputs"], specs["outputs"]


def python_requirement(version):
    """The ``requires`` entry of a package made for Python ``version`` ("X.Y"), or None if
    ``version`` is not of that form."""
    return f"=={version}.*" if _PYTHON_VERSION.fullmatch(version) else None


def _check_torch_export_fields(config, fail):
    names = {spec["name"] for spec in config["inputs"]}
    positional = config.get("positional_inputs")
    if not isinstance(positional, list) or not set(positional) <= names \
            or len(set(positional)) != len(positional):
        fail("'positional_inputs' must list distinct input names")
    if not isinstance(config.get("aot"), bool):
        fail("'aot' must be true or false")
    if config["aot"] and config.get("aot_device") not in ("cpu", "cuda"):
        fail("'aot_device' must be 'cpu' or 'cuda'")


def _entrypoint_problem(entrypoint):
    """Why ``entrypoint`` is not of the form "package.module:factory", or None if it is."""
    module, _, function = entrypoint.partition(":") if isinstance(entrypoint, str) else ("", "", "")
    if function.isidentifier() and all(part.isidentifier() for part in module.split(".")):
        return None
    return f"entrypoint must look like 'package.module:factory', got {entrypoint!r}"
