"""One host job serving models of six kinds side by side, each in a worker of its own.

    python3 examples/frameworks.py [--without tensorflow,numpy1]

A torch.export program, a TorchScript module, an ONNX graph and a Keras 3 model (torch
backend) run on the host's own interpreter; a TensorFlow SavedModel runs in an environment
with tensorflow-cpu, which this host does not have; a numpy-1 model runs on Python 3.10. The
last two are packaged with locked requirements, and ``ope.load`` builds their environments on
first use (seconds with a warm download cache; TensorFlow is ~270 MB the first time), showing
progress; later runs reuse them. The TensorFlow environment is first built here to make the
SavedModel (the host cannot); the package's lock then names the same pins, so its load finds
it built.

Every model gets the same batch, submitted to all of them at once, and each answer is checked
against its framework called directly (in this process, or in the environment's Python for
TensorFlow). Per model it prints the runner, the framework and its version, the worker's Python
and pid.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np

import ope
from ope import TensorSpec, envs

BATCH = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
X_SPEC = [TensorSpec("x", "float32", ("batch", 4))]
Y_SPEC = [TensorSpec("y", "float32", ("batch", 3))]
TF_REQUIRES = {"tensorflow-cpu": "==2.21.*"}
WEIGHTS = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)


def torch_module():
    import torch

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(WEIGHTS.copy()))

        def forward(self, x):
            return torch.tanh(x @ self.w)
    return Linear().eval()


def torch_export_model(root):
    import torch
    module = torch_module()
    program = torch.export.export(module, (torch.from_numpy(BATCH),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    package = ope.package_torch_export(os.path.join(root, "export"), program, name="export",
                                       inputs=X_SPEC, outputs=Y_SPEC)
    with torch.inference_mode():
        return package, module(torch.from_numpy(BATCH)).numpy()


def torchscript_model(root):
    import torch
    module = torch_module()
    with warnings.catch_warnings():  # torch deprecates TorchScript; ope still runs it
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        package = ope.package_torchscript(os.path.join(root, "script"), scripted, name="script",
                                          inputs=X_SPEC, outputs=Y_SPEC)
    with torch.inference_mode():
        return package, scripted(torch.from_numpy(BATCH)).numpy()


def onnx_model(root):
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Tanh", ["xw"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(WEIGHTS, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    package = ope.package_onnx(os.path.join(root, "onnx"), model, name="onnx")  # specs: graph's
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return package, session.run(["y"], {"x": BATCH})[0]


def keras_model(root):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    inputs = keras.Input((4,), name="x")
    layer = keras.layers.Dense(3, activation="tanh", use_bias=False)
    model = keras.Model(inputs, {"y": layer(inputs)})
    layer.set_weights([WEIGHTS])
    package = ope.package_keras(os.path.join(root, "keras"), model, name="keras",
                                outputs=[TensorSpec("y", "float32", ("batch", 3))])
    return package, keras.ops.convert_to_numpy(model(BATCH)["y"])


_MAKE_SAVED_MODEL = """
import sys

import numpy as np
import tensorflow as tf


class Linear(tf.Module):
    def __init__(self, weights):
        self.w = tf.Variable(weights)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.tanh(tf.matmul(x, self.w))}


model = Linear(np.load(sys.argv[2]))
tf.saved_model.save(model, sys.argv[1], signatures={"serving_default": model.serve})
np.save(sys.argv[4], model.serve(tf.constant(np.load(sys.argv[3])))["y"].numpy())
"""


def tensorflow_model(root):
    env = envs.ensure_env(envs.lock(TF_REQUIRES, _host_minor()),
                          progress=envs.progress_reporter())
    script, folder = os.path.join(root, "make_saved_model.py"), os.path.join(root, "saved")
    with open(script, "w") as file:
        file.write(textwrap.dedent(_MAKE_SAVED_MODEL))
    files = [os.path.join(root, name) for name in ("w.npy", "x.npy", "y.npy")]
    np.save(files[0], WEIGHTS)
    np.save(files[1], BATCH)
    subprocess.run([env.python, script, folder, *files], check=True, capture_output=True)
    package = ope.package_tensorflow(os.path.join(root, "tensorflow"), folder, name="tensorflow",
                                     requires=TF_REQUIRES)
    return package, np.load(files[2])


_NUMPY1_SOURCE = """
import numpy as np


def factory(data_dir):
    weights = np.load(data_dir + "/w.npy")
    return lambda x: {"y": np.tanh(x @ weights)}
"""


def numpy1_model(root):
    code, data = os.path.join(root, "numpy1_code"), os.path.join(root, "numpy1_data")
    os.makedirs(code)
    os.makedirs(data)
    with open(os.path.join(code, "model.py"), "w") as file:
        file.write(textwrap.dedent(_NUMPY1_SOURCE))
    np.save(os.path.join(data, "w.npy"), WEIGHTS)
    package = ope.package_python(os.path.join(root, "numpy1"), name="numpy1", code_dir=code,
                                 data_dir=data, entrypoint="model:factory", python="3.10",
                                 requires={"numpy": "<2"}, inputs=X_SPEC, outputs=Y_SPEC)
    return package, np.tanh(BATCH @ WEIGHTS)


MAKERS = {"torch_export": torch_export_model, "torchscript": torchscript_model,
          "onnx": onnx_model, "keras": keras_model, "tensorflow": tensorflow_model,
          "numpy1": numpy1_model}


def _host_minor():
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", default="", help="comma-separated kinds to leave out: "
                                                       + ", ".join(MAKERS))
    args = parser.parse_args()
    kinds = [kind for kind in MAKERS if kind not in args.without.split(",")]
    with tempfile.TemporaryDirectory(prefix="ope-frameworks-") as root:
        made = {kind: MAKERS[kind](root) for kind in kinds}
        models = {kind: ope.load(package.path) for kind, (package, _) in made.items()}
        try:
            futures = {kind: model.submit({"x": BATCH}) for kind, model in models.items()}
            print(f"{'model':<13} {'runner':<13} {'framework':<22} {'python':<8} {'pid':>7}  "
                  f"result")
            for kind, future in futures.items():
                got, want = future.result()["y"], made[kind][1]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                worker = models[kind].stats()["worker"]
                framework = f"{worker['framework']} {worker['framework_version']}"
                print(f"{kind:<13} {worker['runner']:<13} {framework:<22} "
                      f"{worker['python']:<8} {worker['pid']:>7}  matches the framework "
                      f"called directly")
        finally:
            for model in models.values():
                model.close()
    print(f"host: Python {_host_minor()}, pid {os.getpid()}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
