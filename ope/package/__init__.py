"""Model packages: the format, read and verified (format.py), and the builders that write a
package and check it before it appears on disk (build.py; a module per framework's builders:
torch_builders.py, onnx_builder.py, keras_model.py, saved_model.py).

The builders take the self-check to run as an argument, since running a model is a layer
above this one; ``ope.package_torchscript`` and the other public builders (ope/api.py) pass
``ope.api.self_check``.
"""

from ope.package.format import (FORMAT, FORMAT_VERSION, FRAMEWORKS, RUNNERS, Package,
                                read_package)

__all__ = ["FORMAT", "FORMAT_VERSION", "RUNNERS", "FRAMEWORKS", "Package", "read_package"]
