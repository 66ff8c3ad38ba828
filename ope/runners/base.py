"""What every runner shares: the Runner interface and the calling of the model's own code,
whose exceptions become ModelErrors that start at the model's frame."""

import sys

from ope.errors import model_error

__all__ = ["Runner", "call_model", "model_error_of"]


class Runner:
    """Executes one loaded model: ``run(inputs) -> outputs``, both dicts keyed by name.

    ``threads``: the intra-op threads the runtime's own pools may use (None: its default);
    ``device``: where the model and its inputs go, "cpu" or "cuda:N" as this process numbers
    its GPUs (None: the CPU). ``framework`` names the module whose version :meth:`describe`
    reports.
    """

    framework = "numpy"

    def __init__(self, package, private_inputs=False, threads=None, device=None):
        self.package = package
        self.private_inputs = private_inputs
        self.threads = threads
        self.device = device

    def run(self, inputs):
        raise NotImplementedError

    def close(self):
        """Release what the model holds beyond memory (open files), when it is closed in
        process; a worker's end releases everything."""

    def describe(self):
        """The runner, its framework and the framework's version, for ``Model.stats()``."""
        module = sys.modules.get(self.framework)
        return {"runner": self.package.runner, "framework": self.framework,
                "framework_version": getattr(module, "__version__", None)}


def model_error_of(package, error, while_doing):
    """ModelError for an exception raised by the model's code; the traceback starts at the
    model's frame, not ours."""
    frames = error.__traceback__.tb_next if error.__traceback__ else None
    return model_error(error, f"model {package.name!r} raised {type(error).__name__} "
                              f"{while_doing}", frames)


def call_model(package, model, inputs, positional=()):
    try:
        return model(*positional, **inputs)
    except Exception as error:
        raise model_error_of(package, error, "while running") from None
