"""Packaging ONNX models: the model (a file, its bytes or an ``onnx.ModelProto``) is written
into the package as model.onnx, and its tensor specs are read from the graph or, when given,
checked against it, so a package never promises what its graph contradicts.

Read from the graph: each input (initializers excepted: they are weights) and output keeps its
name, its element type as an ope dtype, and per dim its ``dim_value`` (a fixed size), its
``dim_param`` (a symbol; one that is not a Python identifier, such as "N+1", becomes any
size), or any size where the graph says nothing.
"""

import functools
import os

from ope.errors import PackageError, SpecError
from ope.package.build import Environment, _build, _copy_file, _with_requirement
from ope.package.format import MODEL_FILES
from ope.package.sniff import check_format
from ope.spec import TensorSpec, as_specs

__all__ = ["package_onnx"]

# ONNX element types (onnx.TensorProto.DataType) ope has a dtype for.
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
           7: "int64", 8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32",
           13: "uint64"}
_EXTERNAL_DATA = MODEL_FILES["onnx"] + ".data"


def package_onnx(path, model, *, name, inputs=None, outputs=None, requires=None, python=None,
                 lock="auto", test_inputs=None, test_outputs=None, self_check,
                 lock_requirements):
    """Package an ONNX model: ``model`` is the path of an .onnx file, its bytes, or an
    ``onnx.ModelProto``. ``inputs``/``outputs`` default to the graph's own; given, they must
    agree with it (names, dtypes, ranks, fixed sizes), else SpecError naming the tensor and
    what the graph says. The finished package is always loaded once by onnxruntime and, given
    test data, self-checked by ``self_check``. Returns the Package."""
    onnx = _import_onnx()
    proto, source = _parse(onnx, model)
    graph_inputs, graph_outputs = _graph_tensors(onnx, proto, source)
    inputs = _agreeing_specs(inputs, graph_inputs, "input", source)
    outputs = _agreeing_specs(outputs, graph_outputs, "output", source)

    def write_artefacts(staging):
        _write_model(onnx, model, proto, os.path.join(staging, MODEL_FILES["onnx"]))
        return {"model_file": MODEL_FILES["onnx"]}

    return _build(path, "onnx", write_artefacts, name=name, inputs=inputs, outputs=outputs,
                  requires=_with_requirement(requires, "onnxruntime"), test_inputs=test_inputs,
                  test_outputs=test_outputs, load_check=True, self_check=self_check,
                  environment=Environment(python, lock, lock_requirements))


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise PackageError("packaging an ONNX model needs the onnx package (pip install "
                           "'ope[onnx]')") from None
    return onnx


def _parse(onnx, model):
    """(ModelProto without its external data, how to name the model in errors)."""
    if isinstance(model, onnx.ModelProto):
        return model, "the ModelProto given"
    if isinstance(model, (bytes, bytearray, memoryview)):
        source, parse, argument = "the bytes given", onnx.load_model_from_string, bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        source = argument = os.fspath(model)
        check_format(source, {"onnx"}, "package_onnx")
        parse = functools.partial(onnx.load, load_external_data=False)
    else:
        raise PackageError(f"package_onnx takes the path of an .onnx file, its bytes or an "
                           f"onnx.ModelProto, got {type(model).__name__}")
    try:
        proto = parse(argument)
    except Exception as error:  # protobuf's DecodeError, OSError, ...
        raise PackageError(f"{source}: not a readable ONNX model ({error})") from None
    # protobuf parses many byte strings into some message: an ONNX model has these.
    if proto.ir_version <= 0 or not proto.graph.output:
        raise PackageError(f"{source}: not an ONNX model (no ir_version or no graph outputs)")
    return proto, source


def _graph_tensors(onnx, proto, source):
    """The graph's inputs and outputs: {name: (dtype, dims or None if the rank is unknown)}."""
    weights = {initializer.name for initializer in proto.graph.initializer}
    inputs = {value.name: _describe(onnx, value, "input", source)
              for value in proto.graph.input if value.name not in weights}
    outputs = {value.name: _describe(onnx, value, "output", source)
               for value in proto.graph.output}
    return inputs, outputs


def _describe(onnx, value, role, source):
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise SpecError(f"{source}: graph {role} {value.name!r} is a {kind or 'value of no type'}"
                        f", not a tensor; ope passes tensors only")
    tensor = value.type.tensor_type
    dtype = _DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise SpecError(f"{source}: graph {role} {value.name!r} has element type "
                        f"{_type_name(onnx, tensor.elem_type)}, which ope has no dtype for "
                        f"(it takes {', '.join(sorted(set(_DTYPES.values())))})")
    if not tensor.HasField("shape"):
        return dtype, None
    return dtype, tuple(_dim(dim) for dim in tensor.shape.dim)


def _dim(dim):
    kind = dim.WhichOneof("value")
    if kind == "dim_value":
        return dim.dim_value
    if kind == "dim_param" and dim.dim_param.isidentifier():
        return dim.dim_param
    return None


def _type_name(onnx, elem_type):
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


def _agreeing_specs(specs, graph, role, source):
    """``specs`` checked against the graph's tensors, or the graph's own when None."""
    if specs is None:
        return tuple(_spec_of_graph(name, dtype, dims, role, source)
                     for name, (dtype, dims) in graph.items())
    specs = as_specs(specs, role)
    given = {spec.name for spec in specs}
    missing, extra = [n for n in graph if n not in given], sorted(given - set(graph))
    if missing or extra:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"not in the graph: {', '.join(extra)}"] if extra else [])
        raise SpecError(f"{role} specs do not match the graph of {source}, whose {role}s are "
                        f"{', '.join(graph) or 'none'}: {'; '.join(problems)}")
    for spec in specs:
        _check_agrees(spec, *graph[spec.name], role)
    return specs


def _spec_of_graph(name, dtype, dims, role, source):
    if dims is None:
        raise SpecError(f"{source}: the graph does not say the rank of {role} {name!r}; pass "
                        f"{role}s=[TensorSpec(...)] for the model's {role}s")
    if not name.isidentifier():
        raise SpecError(f"{source}: graph {role} {name!r} is not a Python identifier, which "
                        f"ope's tensor names are; rename it in the graph (the {role} and the "
                        f"nodes using it)")
    return TensorSpec(name, dtype, dims)


def _check_agrees(spec, dtype, dims, role):
    where = f"{role} {spec.name!r}"
    if spec.dtype != dtype:
        raise SpecError(f"{where}: the spec says dtype {spec.dtype}, the graph {dtype}")
    if dims is None:
        return
    if len(spec.shape) != len(dims):
        raise SpecError(f"{where}: the spec has rank {len(spec.shape)} {list(spec.shape)}, the "
                        f"graph rank {len(dims)} {list(dims)}")
    for index, (want, have) in enumerate(zip(spec.shape, dims)):
        if type(want) is int and type(have) is int and want != have:
            raise SpecError(f"{where}: dim {index} is {want} in the spec, {have} in the graph "
                            f"{list(dims)}")


def _write_model(onnx, model, proto, target):
    """The model as model.onnx; weights a file keeps beside it go to model.onnx.data."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        with open(target, "wb") as file:
            file.write(model)
        return
    if isinstance(model, onnx.ModelProto):
        _save(onnx, model, target, model.ByteSize() >= 2**31 - 1)
        return
    if not _uses_external_data(proto):
        _copy_file(model, target)
        return
    try:
        full = onnx.load(os.fspath(model))  # reads the weights from beside the file
    except Exception as error:
        raise PackageError(f"{os.fspath(model)}: cannot read its external data ({error})") from None
    _save(onnx, full, target, True)


def _save(onnx, proto, target, external):
    options = ({"save_as_external_data": True, "all_tensors_to_one_file": True,
                "location": _EXTERNAL_DATA} if external else {})
    try:
        onnx.save_model(proto, target, **options)
    except Exception as error:
        raise PackageError(f"cannot write the ONNX model into the package: {error}") from None


def _uses_external_data(proto):
    return any(tensor.data_location == tensor.EXTERNAL for tensor in proto.graph.initializer)
