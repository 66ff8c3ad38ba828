"""The add-one model several benchmarks time: a numpy python package, y = x + 1 on a float32
vector of any length."""

import os

import ope

_SOURCE = '''
def factory(data_dir):
    def add_one(x):
        return {"y": x + 1}
    return add_one
'''


def build_package(root):
    """Package the add-one model under ``root``; returns the package's path."""
    code = os.path.join(root, "code")
    os.makedirs(code)
    with open(os.path.join(code, "add_one.py"), "w") as f:
        f.write(_SOURCE)
    spec = [ope.TensorSpec("x", "float32", ("n",))]
    return ope.package_python(os.path.join(root, "add_one"), name="add_one", code_dir=code,
                              entrypoint="add_one:factory", inputs=spec,
                              outputs=[ope.TensorSpec("y", "float32", ("n",))]).path
