"""The TorchScript runner: a module saved with torch.jit.save, called with one keyword
argument per input."""

from ope.errors import PackageError
from ope.runners.torch_runner import TorchRunner

__all__ = ["TorchScriptRunner"]


class TorchScriptRunner(TorchRunner):
    """Calls ``forward`` with one keyword argument per input, under inference mode; results are
    bound to the output names by ope/runners/outputs.py."""

    def __init__(self, package, *options):
        super().__init__(package, *options)
        try:
            self._module = self._torch.jit.load(package.model_file,
                                                map_location=self._device).eval()
        except Exception as error:
            raise PackageError(f"package {package.name!r}: cannot load its TorchScript file "
                               f"{package.config['model_file']}: {error}") from None
        self._check_signature()
        self._string_inputs = frozenset(s.name for s in package.inputs if s.dtype == "string")

    def _check_signature(self):
        parameters = [arg.name for arg in self._module.forward.schema.arguments[1:]]
        expected = sorted(spec.name for spec in self.package.inputs)
        if sorted(parameters) != expected:
            raise PackageError(f"package {self.package.name!r}: forward({', '.join(parameters)}) "
                               f"does not take exactly the inputs {', '.join(expected)}")

    def run(self, inputs):
        # TorchScript takes strings as List[str], not arrays.
        return self.call(self._module, {
            name: array.tolist() if name in self._string_inputs else self.tensor(array)
            for name, array in inputs.items()})
