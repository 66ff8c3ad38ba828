"""Packaging a Keras 3 model: the ``.keras`` file (a zip of ``config.json``, ``metadata.json``
and the weights) goes into the package as ``model.keras``, with the backend it runs on.

The input specs can be read from the model's own ``keras.Input`` layers, in the file's
``config.json`` or the serialized model object, without running keras on a backend: each
input's name (its key, for a model built on a dict of inputs), dtype and shape, the batch
dimension as the symbol "batch" that every input and output shares.
"""

import json
import os
import sys
import zipfile

from ope.errors import PackageError
from ope.package.build import Environment, _build, _copy_file, _with_requirement
from ope.package.format import MODEL_FILES
from ope.package.sniff import check_format
from ope.runners.keras import BACKENDS
from ope.spec import DTYPES, TensorSpec

__all__ = ["package_keras"]

BATCH = "batch"


def package_keras(path, model, *, name, outputs, inputs=None, backend=None, requires=None,
                  python=None, lock="auto", test_inputs=None, test_outputs=None, self_check,
                  lock_requirements):
    """Package a Keras 3 model (a model object, saved with ``model.save``, or the path of a
    ``.keras`` file) to run on ``backend`` ("torch", "jax" or "tensorflow"; default: the
    backend of the keras imported here). ``inputs`` default to the model's ``keras.Input``
    layers (named by ``keras.Input(name=...)``, or by their keys for a model built on a dict);
    ``outputs`` bind by name to a dict the model returns, else in order. ``requires`` gets
    keras and the backend's framework. Given test data, the package is self-checked by
    ``self_check`` (ope/package/build.py); without, it is loaded once here when this
    process's keras runs on ``backend``. Returns the Package."""
    if isinstance(model, (str, os.PathLike)):
        check_format(model, {"keras"}, "package_keras")
        config = _file_config(model)
    else:
        config = _object_config(model)
    backend = backend or _current_backend()
    if backend not in BACKENDS:
        raise PackageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if inputs is None:
        inputs = input_specs(config, model if isinstance(model, (str, os.PathLike)) else name)

    def write_artefacts(staging):
        target = os.path.join(staging, MODEL_FILES["keras"])
        if isinstance(model, (str, os.PathLike)):
            _copy_file(model, target)
        else:
            _save(model, target)
        return {"model_file": MODEL_FILES["keras"], "backend": backend}

    requires = _with_requirement(_with_requirement(requires, "keras"), BACKENDS[backend])
    loadable_here = "keras" in sys.modules and sys.modules["keras"].backend.backend() == backend
    return _build(path, "keras", write_artefacts, name=name, inputs=inputs, outputs=outputs,
                  requires=requires, test_inputs=test_inputs, test_outputs=test_outputs,
                  load_check=loadable_here, self_check=self_check,
                  environment=Environment(python, lock, lock_requirements))


def input_specs(config, where):
    """The input specs of the serialized model ``config`` (config.json's content), in the
    model's order; PackageError naming ``where`` if it has no ``keras.Input`` layers."""
    body = config.get("config") if isinstance(config, dict) else None
    layers = {layer["config"].get("name"): layer["config"]
              for layer in (body or {}).get("layers", [])
              if layer.get("class_name") == "InputLayer" and isinstance(layer.get("config"), dict)}
    if not layers:
        raise PackageError(f"{where}: the model has no keras.Input layers to read its inputs "
                           f"from (a subclassed model?): pass inputs=[TensorSpec(...), ...]")
    named = _input_names(body.get("input_layers"), list(layers))
    return [_spec(key, layers[layer], where) for key, layer in named]


def _input_names(input_layers, layer_names):
    """(input name, InputLayer name) pairs: a dict of inputs is called by its keys."""
    if isinstance(input_layers, dict):
        return [(key, entry[0]) for key, entry in input_layers.items()]
    if input_layers and isinstance(input_layers[0], (list, tuple)):
        return [(entry[0], entry[0]) for entry in input_layers]
    if input_layers:
        return [(input_layers[0], input_layers[0])]
    return [(layer, layer) for layer in layer_names]  # a Sequential model's one input


def _spec(name, layer, where):
    shape, dtype = layer.get("batch_shape"), layer.get("dtype")
    if not isinstance(shape, (list, tuple)) or dtype not in DTYPES:
        raise PackageError(f"{where}: input {name!r} has shape {shape!r} and dtype {dtype!r}; "
                           f"pass inputs=[TensorSpec(...), ...] for it")
    dims = [BATCH if index == 0 and dim is None else dim for index, dim in enumerate(shape)]
    return TensorSpec(name, dtype, tuple(dims))


def _file_config(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise PackageError(f"{path} is not a Keras 3 .keras file ({error})") from None


def _object_config(model):
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.Model):
        raise PackageError(f"expected a Keras 3 model (keras.Model) or the path of a .keras "
                           f"file, got {type(model).__name__}")
    return keras.saving.serialize_keras_object(model)


def _save(model, target):
    try:
        model.save(target)
    except Exception as error:
        raise PackageError(f"cannot save the Keras model: {type(error).__name__}: "
                           f"{error}") from None


def _current_backend():
    try:
        import keras
    except Exception as error:
        raise PackageError(f"cannot tell which Keras backend to run on ({type(error).__name__}: "
                           f"{error}): pass backend=") from None
    return keras.backend.backend()
