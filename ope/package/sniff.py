"""What a model file or folder looks like, so that one handed to the wrong ``package_*``
function gets an error naming what it is and which function takes it.

Each format is recognised by its container, without importing a framework: torch's zip
archives by their entries (TorchScript keeps ``code/``, a torch.export program
``archive_format``, a torch.package archive ``.data/extern_modules``, a torch.save checkpoint
only ``data.pkl``), a Keras 3 file by its ``config.json`` and ``metadata.json``, an ONNX model
by the first fields of its protobuf (``ir_version``, then a known field), an HDF5 file by its
signature, a SavedModel by its folder's ``saved_model.pb``.
"""

import os
import zipfile

from ope.errors import PackageError

__all__ = ["identify", "check_format"]

# kind -> (what it is, the function that packages it; None for formats ope does not run)
_FORMATS = {
    "torchscript": ("a TorchScript archive (torch.jit.save)", "package_torchscript"),
    "torch_export": ("a torch.export program (.pt2, torch.export.save)", "package_torch_export"),
    "aoti": ("an AOTInductor package (.pt2): compiled code without its program (package the "
             "torch.export program with ope.package_torch_export(..., aot=True) instead)", None),
    "torch_package": ("a torch.package archive (PackageExporter)", "package_torch_package"),
    "torch_checkpoint": ("a torch.save checkpoint: weights, not a runnable model (load them "
                         "into the module, then export it)", None),
    "onnx": ("an ONNX model", "package_onnx"),
    "keras": ("a Keras 3 model file (.keras)", "package_keras"),
    "hdf5": ("an HDF5 file (a legacy Keras .h5 model? load it with keras.saving.load_model "
             "and save it as .keras for package_keras)", None),
    "tensorflow": ("a TensorFlow SavedModel folder", "package_tensorflow"),
}

# ONNX's ModelProto opens with ir_version (field 1, varint), then one of its other fields.
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1a, 0x22, 0x2a, 0x32, 0x3a, 0x42, 0x4a, 0x72, 0x7a})
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def identify(path):
    """The kind of model at ``path`` (a key of the table above), or None if unrecognised."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return "tensorflow" if os.path.isfile(os.path.join(path, "saved_model.pb")) else None
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError:
        return None
    if head.startswith(b"PK"):
        return _identify_zip(path)
    if head.startswith(_HDF5_SIGNATURE):
        return "hdf5"
    if len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in _ONNX_NEXT_TAGS:
        return "onnx"
    return None


def _identify_zip(path):
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    # torch archives put every entry under one top-level folder, whatever its name.
    inner = {name.partition("/")[2] for name in names}
    if {"config.json", "metadata.json"} <= set(names):
        return "keras"
    if ".data/extern_modules" in inner:
        return "torch_package"
    # An AOTInductor package also has archive_format: its compiled code tells it apart.
    if any(name.startswith("data/aotinductor/") for name in inner):
        return "aoti"
    if "archive_format" in inner:
        return "torch_export"
    if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
        return "torchscript"
    if "data.pkl" in inner:
        return "torch_checkpoint"
    return None


def check_format(path, kinds, function):
    """PackageError if ``path`` is recognisably a model of another kind than ``kinds`` (runner
    kinds that ``function``, e.g. "package_onnx", takes), naming what it looks like and which
    function takes it. Silent for files it cannot identify: their loader says what is wrong."""
    kind = identify(path)
    if kind is None or kind in kinds:
        return
    what, packager = _FORMATS[kind]
    advice = f"package it with ope.{packager}" if packager else "ope cannot run it as it is"
    raise PackageError(f"{path} looks like {what}, which ope.{function} does not take: "
                       f"{advice}")
