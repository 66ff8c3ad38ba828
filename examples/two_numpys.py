"""Two models that cannot share a process, served side by side from this one.

"legacy" was written against numpy 1.x on Python 3.10; "current" needs numpy 2 (which the
host has). Each runs in a worker of its own. "legacy" is packaged for Python 3.10 with
``requires={"numpy": "<2"}``, which locks its requirements into the package; ``ope.load``
builds that environment on first use (under $OPE_HOME, default ~/.cache/ope, showing its
progress) and reuses it afterwards. "current" runs on the host's own interpreter. Both compute
the same expression; numpy 2 changed its type promotion (NEP 50), and each model reports the
dtype its numpy gives along with the versions it ran with.

    python3 examples/two_numpys.py
"""

import os
import platform
import tempfile
import textwrap

import numpy as np

import ope
from ope import TensorSpec

SOURCE = """
import platform

import numpy as np


def factory(data_dir):
    def run(x):
        promoted = x + np.float64(0.5)  # numpy 1: stays float32; numpy 2 (NEP 50): float64
        return {"y": promoted.astype(np.float32), "promoted": np.array(str(promoted.dtype)),
                "numpy": np.array(np.__version__), "python": np.array(platform.python_version())}
    return run
"""


def make_package(root, name, requires, python=None):
    code_dir = os.path.join(root, f"{name}-code")
    os.makedirs(code_dir)
    with open(os.path.join(code_dir, "model.py"), "w") as file:
        file.write(textwrap.dedent(SOURCE))
    return ope.package_python(
        os.path.join(root, name), name=name, code_dir=code_dir, entrypoint="model:factory",
        requires=requires, python=python, inputs=[TensorSpec("x", "float32", ("n",))],
        outputs=[TensorSpec("y", "float32", ("n",)), TensorSpec("promoted", "string", ()),
                 TensorSpec("numpy", "string", ()), TensorSpec("python", "string", ())])


def main():
    x = np.array([1, 2, 3], np.float32)
    with tempfile.TemporaryDirectory() as root:
        legacy = make_package(root, "legacy", {"numpy": "<2"}, python="3.10")
        current = make_package(root, "current", {"numpy": ">=2"})
        with ope.load(legacy.path) as old, ope.load(current.path) as new:
            for model in (old, new):
                out = model.infer({"x": x})
                worker = model.stats()["worker"]
                print(f"{model.name:<8} numpy {out['numpy'].item():<7} Python "
                      f"{out['python'].item():<8} pid {worker['pid']:<7} "
                      f"x + float64(0.5) -> {out['promoted'].item():<8} y = {out['y']}")
    print(f"host     numpy {np.__version__:<7} Python {platform.python_version():<8} "
          f"pid {os.getpid()}")


if __name__ == "__main__":
    main()
