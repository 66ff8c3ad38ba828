"""The TensorFlow runner: a SavedModel folder, run through one of its signatures
(``tf.saved_model.load(folder).signatures[signature]``) with one keyword argument per input;
a signature returns a dict, bound to the outputs by name."""

from ope.errors import PackageError
from ope.runners.base import Runner, call_model
from ope.runners.outputs import bind_outputs

__all__ = ["TensorFlowRunner"]


class TensorFlowRunner(Runner):
    """Calls the signature with the inputs as keyword arguments; its tensors come back as
    numpy arrays. ``threads`` bounds TensorFlow's intra-op pool."""

    framework = "tensorflow"

    def __init__(self, package, *options):
        super().__init__(package, *options)
        self._tf = tf = _import_tensorflow(package)
        if self.threads:
            tf.config.threading.set_intra_op_parallelism_threads(self.threads)
        signature = package.config["signature"]
        try:
            loaded = tf.saved_model.load(package.saved_model_dir)
        except Exception as error:
            raise PackageError(f"package {package.name!r}: cannot load SavedModel "
                               f"{package.saved_model_dir}: {type(error).__name__}: "
                               f"{error}") from None
        if signature not in loaded.signatures:
            raise PackageError(f"package {package.name!r}: the SavedModel has no signature "
                               f"{signature!r} (it has {', '.join(loaded.signatures) or 'none'})")
        self._loaded = loaded  # the signature's variables live as long as this object
        self._function = loaded.signatures[signature]

    def run(self, inputs):
        tf = self._tf
        arguments = {name: tf.constant(array) for name, array in inputs.items()}
        result = bind_outputs(self.package, call_model(self.package, self._function, arguments))
        return {name: value.numpy() if isinstance(value, tf.Tensor) else value
                for name, value in result.items()}


def _import_tensorflow(package):
    try:
        import tensorflow
    except ImportError:
        raise PackageError(f"package {package.name!r} needs tensorflow, which is not "
                           f"installed") from None
    return tensorflow
