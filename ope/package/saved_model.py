"""Packaging a TensorFlow SavedModel: the folder is copied into the package as
``saved_model/`` and run through one of its signatures, in a worker whose environment has
TensorFlow (this host needs none).

The specs default to the signature's own, read from ``saved_model.pb`` without TensorFlow by
walking the few protobuf messages on the way (SavedModel -> MetaGraphDef -> SignatureDef ->
TensorInfo): each input and output's key, dtype and shape, an unknown dimension as None.
"""

import os

from ope.errors import PackageError
from ope.package.build import Environment, _build, _copy_tree, _with_requirement
from ope.package.format import _SAVED_MODEL_DIR
from ope.package.sniff import check_format
from ope.spec import TensorSpec

__all__ = ["package_tensorflow", "signature_specs"]

# TensorFlow's DataType enum (types.proto) -> ope dtype
_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
           7: "string", 9: "int64", 10: "bool", 17: "uint16", 19: "float16", 22: "uint32",
           23: "uint64"}


def package_tensorflow(path, saved_model_dir, *, name, signature="serving_default", inputs=None,
                       outputs=None, requires=None, python=None, lock="auto", test_inputs=None,
                       test_outputs=None, self_check, lock_requirements):
    """Package the SavedModel folder ``saved_model_dir`` (``tf.saved_model.save``), run
    through its ``signature`` with one keyword argument per input; the signature's dict of
    outputs binds by name. ``inputs``/``outputs`` default to the signature's. ``requires``
    gets tensorflow (any of its distributions, tensorflow-cpu among them). Given test data,
    the package is self-checked by ``self_check`` (ope/package/build.py), in a worker
    environment with TensorFlow when this host has none; without test data nothing runs it
    before its first load. Returns the Package."""
    saved_model_dir = os.fspath(saved_model_dir)
    check_format(saved_model_dir, {"tensorflow"}, "package_tensorflow")
    if inputs is None or outputs is None:
        found = signature_specs(saved_model_dir, signature)
        inputs = found[0] if inputs is None else inputs
        outputs = found[1] if outputs is None else outputs

    def write_artefacts(staging):
        _copy_tree(saved_model_dir, os.path.join(staging, _SAVED_MODEL_DIR), "saved_model_dir")
        return {"saved_model_dir": _SAVED_MODEL_DIR, "signature": signature}

    return _build(path, "tensorflow", write_artefacts, name=name, inputs=inputs,
                  outputs=outputs, requires=_with_requirement(requires, "tensorflow"),
                  test_inputs=test_inputs, test_outputs=test_outputs, load_check=False,
                  self_check=self_check, environment=Environment(python, lock, lock_requirements))


def signature_specs(saved_model_dir, signature):
    """(inputs, outputs) of ``signature`` in the SavedModel at ``saved_model_dir``, as
    TensorSpecs sorted by name; PackageError naming what could not be read."""
    filename = os.path.join(saved_model_dir, "saved_model.pb")
    try:
        with open(filename, "rb") as file:
            data = memoryview(file.read())
        found, names = _find_signature(data, signature)
    except OSError as error:
        raise PackageError(f"cannot read {filename}: {error}") from None
    except (IndexError, ValueError, KeyError) as error:
        raise PackageError(f"{filename} is not a SavedModel protobuf this reader understands "
                           f"({error}): pass inputs= and outputs=") from None
    if found is None:
        raise PackageError(f"{filename} has no signature {signature!r} (it has "
                           f"{', '.join(sorted(names)) or 'none'})")
    return tuple(_specs(found, field, filename) for field in (1, 2))


def _find_signature(data, wanted):
    """(the SignatureDef named ``wanted`` or None, the names of the signatures seen)."""
    names = set()
    for number, meta_graph in _fields(data):
        if number != 2:  # SavedModel.meta_graphs
            continue
        for field, entry in _fields(meta_graph):
            if field == 5:  # MetaGraphDef.signature_def: map<string, SignatureDef>
                key, value = _map_entry(entry)
                if not bytes(key).startswith(b"__"):  # TensorFlow's own, e.g. its init op
                    names.add(bytes(key).decode())
                if bytes(key).decode() == wanted:
                    return value, names
    return None, names


def _specs(signature_def, field, filename):
    specs = []
    for number, entry in _fields(signature_def):
        if number != field:  # SignatureDef.inputs (1) / outputs (2): map<string, TensorInfo>
            continue
        key, info = _map_entry(entry)
        name = bytes(key).decode()
        dtype, shape = _tensor_info(info)
        if dtype not in _DTYPES or shape is None:
            raise PackageError(f"{filename}: tensor {name!r} has a dtype (enum {dtype}) or shape "
                               f"ope cannot read: pass inputs= and outputs=")
        specs.append(TensorSpec(name, _DTYPES[dtype], shape))
    return sorted(specs, key=lambda spec: spec.name)


def _tensor_info(info):
    """(DataType number, shape tuple or None for an unknown rank) of a TensorInfo."""
    dtype, shape = None, None
    for number, value in _fields(info):
        if number == 2:
            dtype = value
        elif number == 3:  # tensor_shape, a TensorShapeProto: dim (2), unknown_rank (3)
            dims, unknown = [], False
            for field, part in _fields(value):
                if field == 2:
                    size = dict(_fields(part)).get(1, 0)
                    dims.append(None if size >= 1 << 63 else size)  # -1 as an unsigned varint
                elif field == 3:
                    unknown = bool(part)
            shape = None if unknown else tuple(dims)
    return dtype, shape


def _map_entry(entry):
    fields = dict(_fields(entry))
    return fields.get(1, b""), fields.get(2, b"")


def _fields(data):
    """(field number, value) of each field of a protobuf message: an int for varints, a
    memoryview for length-delimited fields; fixed-width fields are skipped."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
            yield number, value
        elif wire == 2:
            length, position = _varint(data, position)
            if position + length > len(data):
                raise ValueError("truncated field")
            yield number, data[position:position + length]
            position += length
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _varint(data, position):
    value, shift = 0, 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
