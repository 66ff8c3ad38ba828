"""What a torch.export program must agree on with a package's input specs, checked when it
is packaged: its user inputs are exactly the specs' names, one tensor each, of the spec's
dtype and rank, and every dim the spec lets vary (a symbol or None) is dynamic in the program,
every size the spec fixes is one the program accepts."""

from ope.errors import PackageError, SpecError

__all__ = ["positional_inputs"]


def positional_inputs(program, specs):
    """The names of the inputs ``program`` takes by position, in order (the others it takes
    by keyword). PackageError if its inputs are not the specs' names, SpecError naming the
    input and dim where a spec disagrees with the program's shapes or dtype."""
    args_spec, kwargs_spec = _children(program.call_spec.in_spec)
    if not all(child.is_leaf() for child in (*_children(args_spec), *_children(kwargs_spec))):
        raise PackageError("the program takes nested inputs (tuples, lists or dicts of "
                           "tensors); export it with one tensor per argument")
    user_inputs = program.graph_signature.user_inputs
    positional = list(user_inputs[:args_spec.num_children])
    names = positional + list(kwargs_spec.context)
    by_name = {spec.name: spec for spec in specs}
    if sorted(names) != sorted(by_name):
        raise PackageError(f"the program takes the inputs ({', '.join(names)}); the input "
                           f"specs name ({', '.join(by_name)}): they must be the same names")
    values = {node.name: node.meta.get("val") for node in program.graph.nodes
              if node.op == "placeholder"}
    for name, placeholder in zip(names, user_inputs):
        _check_input(by_name[name], values.get(placeholder), program.range_constraints)
    return positional


def _children(tree_spec):
    # torch 2.13 deprecates the children_specs attribute for children(); older ones lack it.
    children = getattr(tree_spec, "children", None)
    return children() if callable(children) else tree_spec.children_specs


def _check_input(spec, value, ranges):
    if not hasattr(value, "shape"):
        raise PackageError(f"input {spec.name!r}: the program takes {type(value).__name__} "
                           f"there, not a tensor")
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype != spec.dtype:
        raise SpecError(f"input {spec.name!r}: the spec says {spec.dtype}, the program was "
                        f"exported with {dtype}")
    shape = tuple(value.shape)
    if len(shape) != len(spec.shape):
        raise SpecError(f"input {spec.name!r}: the spec has rank {len(spec.shape)} "
                        f"{spec.shape}, the program takes rank {len(shape)}")
    for index, (wanted, size) in enumerate(zip(spec.shape, shape)):
        _check_dim(spec.name, index, wanted, size, ranges)


def _check_dim(name, index, wanted, size, ranges):
    where = f"input {name!r} dim {index}"
    if isinstance(size, int):  # static in the program
        if isinstance(wanted, int):
            if wanted != size:
                raise SpecError(f"{where}: the spec fixes size {wanted}, the program was "
                                f"exported with size {size}")
            return
        raise SpecError(f"{where}: the spec lets it vary ({wanted!r}) but the program was "
                        f"exported with it static, size {size}: export it with a "
                        f"torch.export.Dim there, or fix the spec's size to {size}")
    bounds = ranges.get(size.node.expr)
    if isinstance(wanted, int) and bounds is not None \
            and not bounds.lower <= wanted <= bounds.upper:
        raise SpecError(f"{where}: the spec fixes size {wanted}, the program takes sizes "
                        f"{bounds.lower} to {bounds.upper} there")
