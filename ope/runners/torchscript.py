"""The TorchScript runner: a module saved with torch.jit.save, called with one keyword
argument per input."""

from ope.errors import PackageError
from ope.runners.base import Runner, call_model
from ope.runners.outputs import bind_outputs
from ope.runners.torch_tensors import (check_inputs_untouched, import_torch, tensors_to_numpy,
                                       to_tensor)

__all__ = ["TorchScriptRunner"]


class TorchScriptRunner(Runner):
    """Calls ``forward`` with one keyword argument per input, under inference mode; results are
    bound to the output names by ope/runners/outputs.py."""

    framework = "torch"

    def __init__(self, package, *options):
        super().__init__(package, *options)
        self._torch = torch = import_torch(package, self.private_inputs)
        try:
            self._module = torch.jit.load(package.model_file, map_location="cpu").eval()
        except Exception as error:
            raise PackageError(f"package {package.name!r}: cannot load TorchScript file "
                               f"{package.model_file}: {error}") from None
        self._check_signature()
        self._string_inputs = frozenset(s.name for s in package.inputs if s.dtype == "string")

    def _check_signature(self):
        parameters = [arg.name for arg in self._module.forward.schema.arguments[1:]]
        expected = sorted(spec.name for spec in self.package.inputs)
        if sorted(parameters) != expected:
            raise PackageError(f"package {self.package.name!r}: forward({', '.join(parameters)}) "
                               f"does not take exactly the inputs {', '.join(expected)}")

    def run(self, inputs):
        torch = self._torch
        # TorchScript takes strings as List[str], not arrays.
        arguments = {name: array.tolist() if name in self._string_inputs
                     else to_tensor(torch, array, self.private_inputs)
                     for name, array in inputs.items()}
        with torch.inference_mode():
            result = call_model(self.package, self._module, arguments)
        check_inputs_untouched(self.package, arguments, torch)
        return tensors_to_numpy(torch, bind_outputs(self.package, result))
