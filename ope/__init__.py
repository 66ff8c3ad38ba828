"""ope: run deep-learning models out of process behind one small API.

    import ope
    with ope.load("path/to/package") as model:
        outputs = model.infer({"x": x})
"""

from ope.errors import *  # noqa: F403 (the error vocabulary is part of the API)
from ope.errors import __all__ as _error_names
from ope.spec import TensorSpec
from ope.package import Package, read_package
from ope.host.model import Model
from ope.api import (load, package_keras, package_onnx, package_placeholder, package_python,
                     package_tensorflow, package_torch_export, package_torch_package,
                     package_torchscript)
from ope.modelset import ModelSet, wait_all
from ope.placement import RayPlacement

__version__ = "0.1.0"

__all__ = ["__version__", "load", "Model", "ModelSet", "wait_all", "TensorSpec", "Package",
           "read_package", "RayPlacement",
           "package_torchscript", "package_torch_export", "package_torch_package",
           "package_python", "package_placeholder", "package_onnx", "package_keras",
           "package_tensorflow", *_error_names]
