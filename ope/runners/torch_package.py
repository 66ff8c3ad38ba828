"""The torch.package runner: an eager model pickled in a torch.package archive, loaded with
``PackageImporter(file).load_pickle(package_name, resource)`` (the archive's own code, kept
apart from this process's modules by torch.package) and called with one keyword argument per
input."""

from ope.errors import PackageError
from ope.runners.base import model_error_of
from ope.runners.torch_runner import TorchRunner

__all__ = ["TorchPackageRunner"]


class TorchPackageRunner(TorchRunner):
    """Loads the pickled model once, then calls it under inference mode; results are bound to
    the output names by ope/runners/outputs.py."""

    def __init__(self, package, *options):
        super().__init__(package, *options)
        config = package.config
        try:
            self._importer = importer = self._torch.package.PackageImporter(package.model_file)
        except Exception as error:
            raise PackageError(f"package {package.name!r}: cannot open its torch.package "
                               f"archive {config['model_file']}: {error}") from None
        try:
            model = importer.load_pickle(config["package_name"], config["resource"],
                                         map_location=self._device)
        except Exception as error:
            raise model_error_of(package, error, f"while unpickling "
                                 f"{config['package_name']}/{config['resource']}") from None
        if not callable(model):
            raise PackageError(f"package {package.name!r}: {config['package_name']}/"
                               f"{config['resource']} is a {type(model).__name__}, not a "
                               f"callable model")
        if isinstance(model, self._torch.nn.Module):
            model = model.to(self._device).eval()
        self._model = model

    def close(self):
        # The archive stays open while its modules live, and they live in reference cycles
        # with the importer: dropping its reader closes the file now.
        self._importer.zip_reader = None
        self._model = None

    def run(self, inputs):
        return self.call(self._model, {name: self.tensor(array)
                                       for name, array in inputs.items()})
