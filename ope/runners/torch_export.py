"""The torch.export runner: a program saved with torch.export.save, run from
``torch.export.load(file).module()``, or an AOTInductor package of it run from
``torch._inductor.aoti_load_package`` (compiled code: no model Python at load).

Inputs bind by the program's argument names; those it took by position (config
"positional_inputs", recorded at packaging from the program's call signature) are passed
in that order, the others by keyword."""

from ope.errors import PackageError
from ope.runners.torch_runner import TorchRunner

__all__ = ["TorchExportRunner"]


class TorchExportRunner(TorchRunner):
    """Runs an exported program (or its AOTInductor build) under inference mode; results are
    bound to the output names by ope/runners/outputs.py."""

    def __init__(self, package, *options):
        super().__init__(package, *options)
        self._positional = tuple(package.config["positional_inputs"])
        aot = package.config["aot"]
        if aot and package.config["aot_device"] != self._device.type:
            raise PackageError(f"package {package.name!r} was compiled ahead of time for "
                               f"{package.config['aot_device']}; it cannot run on device "
                               f"{self.device!r}")
        try:
            self._model = self._load_aot() if aot else self._load_program()
        except Exception as error:
            raise PackageError(f"package {package.name!r}: cannot load its "
                               f"{'AOTInductor package' if aot else 'program'}"
                               f" {package.config['model_file']}: {error}") from None

    def _load_program(self):
        torch = self._torch
        program = torch.export.load(self.package.model_file)
        if self._device.type != "cpu":
            from torch.export.passes import move_to_device_pass
            program = move_to_device_pass(program, self._device)
        return program.module()

    def _load_aot(self):
        index = self._device.index if self._device.index is not None else -1
        return self._torch._inductor.aoti_load_package(self.package.model_file,
                                                       device_index=index)

    def run(self, inputs):
        return self.call(self._model, {name: self.tensor(array)
                                       for name, array in inputs.items()}, self._positional)
