"""What the torch runners share (torchscript.py, torch_export.py, torch_package.py): torch
imported with the runner's threads, the runner's device, tensors for the model on that
device, and the call under inference mode whose result comes back bound and as numpy."""

from ope.runners.base import Runner, call_model
from ope.runners.outputs import bind_outputs
from ope.runners.torch_tensors import (check_inputs_untouched, import_torch, tensors_to_numpy,
                                       to_tensor, torch_device)

__all__ = ["TorchRunner"]


class TorchRunner(Runner):
    """A runner whose model is a torch callable; ``self.device`` is the torch device's name
    ("cpu", "cuda:0", ...) once loaded."""

    framework = "torch"

    def __init__(self, package, *options):
        super().__init__(package, *options)
        self._torch = import_torch(package, self.private_inputs, self.threads)
        self._device = torch_device(self._torch, self.device)
        self.device = str(self._device)

    def describe(self):
        return {**super().describe(), "device": self.device}

    def tensor(self, array):
        return to_tensor(self._torch, array, self.private_inputs, self._device)

    def call(self, model, arguments, positional=()):
        """``model`` called under inference mode with ``arguments`` (name -> value): those
        named in ``positional`` by position in that order, the others by keyword. Returns the
        outputs by name, as numpy."""
        torch = self._torch
        keywords = {name: value for name, value in arguments.items() if name not in positional}
        with torch.inference_mode():
            result = call_model(self.package, model, keywords,
                                [arguments[name] for name in positional])
        check_inputs_untouched(self.package, arguments, torch)
        return tensors_to_numpy(torch, bind_outputs(self.package, result))
