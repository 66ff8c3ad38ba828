"""What every runner shares: the Runner interface and the calling of the model's own code,
whose exceptions become ModelErrors that start at the model's frame."""

from ope.errors import model_error

__all__ = ["Runner", "call_model", "model_error_of"]


class Runner:
    """Executes one loaded model: ``run(inputs) -> outputs``, both dicts keyed by name."""

    def __init__(self, package, private_inputs=False):
        self.package = package
        self.private_inputs = private_inputs

    def run(self, inputs):
        raise NotImplementedError


def model_error_of(package, error, while_doing):
    """ModelError for an exception raised by the model's code; the traceback starts at the
    model's frame, not ours."""
    frames = error.__traceback__.tb_next if error.__traceback__ else None
    return model_error(error, f"model {package.name!r} raised {type(error).__name__} "
                              f"{while_doing}", frames)


def call_model(package, model, inputs):
    try:
        return model(**inputs)
    except Exception as error:
        raise model_error_of(package, error, "while running") from None
