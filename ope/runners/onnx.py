"""The ONNX runner: an onnxruntime InferenceSession over the package's model.onnx, fed the
inputs by name; the graph's outputs are the output specs' names.

``threads`` sets the session's intra-op pool (and one inter-op thread: the graph runs its
nodes in order); ``device="cuda:N"`` puts the session on CUDAExecutionProvider's device N,
with the CPU provider behind it for the nodes CUDA lacks.
"""


import numpy as np

from ope.devices import cuda_index
from ope.errors import EnvError, PackageError
from ope.runners.base import Runner, call_model

__all__ = ["OnnxRunner"]


class OnnxRunner(Runner):
    """Runs the graph with onnxruntime; string tensors go in and come back as str arrays."""

    framework = "onnxruntime"

    def __init__(self, package, *options):
        super().__init__(package, *options)
        ort = _import_onnxruntime(package)
        session_options = ort.SessionOptions()
        if self.threads:
            session_options.intra_op_num_threads = self.threads
            session_options.inter_op_num_threads = 1
        providers = _providers(ort, self.device)
        try:
            self._session = ort.InferenceSession(package.model_file, session_options,
                                                 providers=providers)
        except Exception as error:
            raise PackageError(f"package {package.name!r}: onnxruntime cannot load its model: "
                               f"{error}") from None
        # onnxruntime falls back to the CPU, with a warning only, when CUDA fails to start.
        if providers[0] != "CPUExecutionProvider" and \
                providers[0][0] not in self._session.get_providers():
            raise EnvError(f"device {self.device!r}: onnxruntime could not start "
                           f"{providers[0][0]} (its CUDA or cuDNN libraries?) and fell back to "
                           f"{', '.join(self._session.get_providers())}")
        self._output_names = [output.name for output in self._session.get_outputs()]
        self._string_outputs = {spec.name for spec in package.outputs if spec.dtype == "string"}

    def run(self, inputs):
        results = call_model(self.package, self._run_session, inputs)
        outputs = dict(zip(self._output_names, results))
        # onnxruntime returns string tensors as object arrays; ope's are fixed-width str.
        for name in self._string_outputs:
            outputs[name] = np.asarray(outputs[name], dtype=str)
        return outputs

    def _run_session(self, **feed):
        return self._session.run(self._output_names, feed)

    def describe(self):
        options = self._session.get_session_options()
        return {**super().describe(), "providers": self._session.get_providers(),
                "intra_op_num_threads": options.intra_op_num_threads}


def _import_onnxruntime(package):
    try:
        import onnxruntime
    except ImportError:
        raise PackageError(f"package {package.name!r} needs onnxruntime, which is not "
                           f"installed") from None
    return onnxruntime


def _providers(ort, device):
    """The execution providers for ``device`` (None or "cpu": the CPU)."""
    index = cuda_index(device)
    if index is None:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EnvError(f"device {device!r}: this onnxruntime ({ort.__version__}) has no "
                       f"CUDAExecutionProvider, only {', '.join(available)}; install "
                       f"onnxruntime-gpu in the worker's environment")
    return [("CUDAExecutionProvider", {"device_id": index}),
            "CPUExecutionProvider"]
