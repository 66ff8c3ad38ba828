"""Tensor specs and the check every call passes through.

Design idea: a list of specs is compiled once into a plan (per tensor: the numpy dtype,
the rank, the fixed dims, the symbol dims) and the plan is cached by the identity of the
spec tuple. Checking a call is then a few attribute reads and comparisons per tensor; all
message formatting lives on the failure path. This matters because the out-of-process mode
validates every call on a round trip of a few tens of microseconds.

Dims: an int is a fixed size, ``None`` is any size, a string is a symbol that must resolve
to the same size everywhere it appears within one call, across inputs and outputs.

String tensors are numpy arrays of dtype kind ``"U"`` (fixed-width unicode), never
``dtype=object``: a ``"U"`` array is one contiguous buffer, so it can be written to
``.npz`` without pickle and placed in shared memory. ``numpy_dtype`` of a string spec is
``np.dtype(str)`` (``<U0``, meaning "any width"). Inputs may also be given as a str (rank
0), (nested) lists or tuples of str, or object arrays of str; those are converted (copied)
to kind ``"U"``.
Numeric values are never cast: a float64 array for a float32 spec is a SpecError.
"""

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import ope_native
from ope.errors import SpecError

__all__ = ["DTYPES", "TensorSpec", "as_specs", "check_shape", "validate_inputs",
           "validate_outputs", "input_plan", "output_plan", "check_inputs", "check_outputs"]

# bool, int8, int16, int32, int64, uint8, uint16, uint32, uint64, float16, float32, float64 and
# string, in the order of their codes in a tensor frame: ope_native declares them with the
# frame's layout (ope_native/src/layout.h).
DTYPES = ope_native.DTYPE_NAMES

_NUMPY_DTYPES = {name: np.dtype(str if name == "string" else name) for name in DTYPES}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype (one of :data:`DTYPES`) and shape (int, ``None`` or symbol per dim)."""

    name: str
    dtype: str
    shape: tuple

    def __post_init__(self):
        _check_identifier(self.name, "tensor name", self.name)
        if not isinstance(self.dtype, str) or self.dtype not in _NUMPY_DTYPES:
            raise SpecError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}; "
                            f"expected one of {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", _normalise_shape(self.name, self.shape))

    @property
    def numpy_dtype(self):
        """The numpy dtype of arrays of this tensor (``<U0`` = any-width str for "string")."""
        return _NUMPY_DTYPES[self.dtype]

    def to_dict(self):
        """A json/msgpack-friendly dict: ``{"name", "dtype", "shape"}``."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict`; SpecError on missing or unknown keys."""
        if not isinstance(data, Mapping) or set(data) != {"name", "dtype", "shape"}:
            raise SpecError(f"a tensor spec needs exactly the keys name, dtype, shape; "
                            f"got {data!r}")
        return cls(data["name"], data["dtype"], data["shape"])


def _check_identifier(value, what, tensor):
    if not isinstance(value, str) or not value.isidentifier():
        raise SpecError(f"tensor {tensor!r}: {what} must be a Python identifier, got {value!r}")


def _normalise_shape(name, shape):
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise SpecError(f"tensor {name!r}: shape must be a sequence of dims, got {shape!r}")
    return tuple(_normalise_dim(name, index, dim) for index, dim in enumerate(shape))


def _normalise_dim(name, index, dim):
    if dim is None:
        return None
    if isinstance(dim, str):
        _check_identifier(dim, f"symbol of dim {index}", name)
        return dim
    if not isinstance(dim, bool):
        try:
            size = operator.index(dim)
        except TypeError:
            pass
        else:
            if size >= 0:
                return size
    raise SpecError(f"tensor {name!r}: dim {index} must be an int >= 0, None or a symbol "
                    f"name, got {dim!r}")


def as_specs(specs, role):
    """Check a sequence of TensorSpec (``role`` is "input" or "output") and return it as a
    tuple; SpecError on a non-spec item or a duplicate name."""
    if isinstance(specs, (str, bytes, Mapping)) or not hasattr(specs, "__iter__"):
        raise SpecError(f"{role} specs must be a sequence of TensorSpec, got {specs!r}")
    specs = tuple(specs)
    seen = set()
    for spec in specs:
        if not isinstance(spec, TensorSpec):
            raise SpecError(f"{role} specs must be TensorSpec objects, got {spec!r}")
        if spec.name in seen:
            raise SpecError(f"duplicate {role} name {spec.name!r}")
        seen.add(spec.name)
    return specs


# --- compiled checks -------------------------------------------------------------------

class _TensorCheck:
    """What one spec requires of an array, precomputed for the success path.

    ``fixed_dims(shape)`` picks the fixed dims in one C call (an itemgetter) for comparison
    with ``fixed_sizes``; ``symbols`` lists (dim index, symbol) pairs.
    """

    __slots__ = ("spec", "name", "role", "dtype", "is_string", "as_is_type", "rank",
                 "fixed_dims", "fixed_sizes", "symbols")

    def __init__(self, spec, role):
        self.spec = spec
        self.name = spec.name
        self.role = role
        self.dtype = spec.numpy_dtype
        self.is_string = spec.dtype == "string"
        # Values of exactly this type need no conversion: plain ndarrays, unless strings.
        self.as_is_type = _NeverAValue if self.is_string else np.ndarray
        self.rank = len(spec.shape)
        fixed = [(i, d) for i, d in enumerate(spec.shape) if type(d) is int]
        # itemgetter of one index returns a scalar, of several a tuple: match that.
        self.fixed_dims = operator.itemgetter(*(i for i, _ in fixed)) if fixed else _no_dims
        self.fixed_sizes = fixed[0][1] if len(fixed) == 1 else tuple(d for _, d in fixed)
        self.symbols = tuple((i, d) for i, d in enumerate(spec.shape) if type(d) is str)


def _no_dims(shape):
    return ()


class _NeverAValue:
    """A type no value has; makes ``type(value) is check.as_is_type`` false for strings."""


class _Plan:
    """The checks of one tuple of specs in one role, made once: :meth:`check` runs them.
    A model holds its two (:func:`input_plan`, :func:`output_plan`) and checks every call
    with them."""

    __slots__ = ("specs", "role", "names", "checks", "count", "rows", "native_rows")

    def __init__(self, specs, role):
        self.specs = specs
        self.role = role
        self.checks = tuple(_TensorCheck(spec, role) for spec in as_specs(specs, role))
        self.names = frozenset(check.name for check in self.checks)
        self.count = len(self.checks)
        # The check loop unpacks one tuple per tensor: cheaper than reading each attribute.
        self.rows = tuple((c.name, c.as_is_type, c.dtype, c.rank, c.fixed_dims, c.fixed_sizes,
                           c.symbols, c) for c in self.checks)
        # The same rules for ope_native.check_plain, which runs the success path in C.
        self.native_rows = tuple(
            (c.name, c.as_is_type, c.dtype, c.rank,
             tuple((i, d) for i, d in enumerate(c.spec.shape) if type(d) is int), c.symbols)
            for c in self.checks)

    def check(self, values, sizes, bound_by_inputs=None):
        """The arrays of ``values`` by name, if they pass; ``sizes`` collects the size of each
        symbol. Plain arrays that pass take the rules in one C call (ope_native.check_plain);
        the loop in Python converts the rest and words every error."""
        arrays = _check_plain(self.native_rows, values, sizes)
        if arrays is None:
            arrays = _check_each(self, values, sizes, bound_by_inputs)
        return arrays


class _SymbolConflict(Exception):
    """Raised inside the check loop; the handler, which knows the call so far, words the
    SpecError (where the symbol got its first size)."""

    def __init__(self, check, index, symbol, bound, got):
        super().__init__(symbol)
        self.check, self.index, self.symbol, self.bound, self.got = check, index, symbol, bound, got


# Plans keyed by id() of the spec tuple, one cache per role. An entry holds the tuple itself,
# so its id cannot be reused while cached; the identity check guards against a stale id.
_INPUT_PLANS = {}
_OUTPUT_PLANS = {}
_MAX_PLANS = 256


_check_plain = ope_native.check_plain


def _plan_for(cache, specs, role):
    plan = cache.get(id(specs))
    if plan is not None and plan.specs is specs:
        return plan
    plan = _Plan(specs, role)
    if type(specs) is tuple:  # only immutable sequences are safe to cache by identity
        if len(cache) >= _MAX_PLANS:
            cache.clear()
        cache[id(specs)] = plan
    return plan


def input_plan(specs):
    """The checks of ``specs`` as inputs, for :func:`check_inputs`."""
    return _plan_for(_INPUT_PLANS, specs, "input")


def output_plan(specs):
    """The checks of ``specs`` as outputs, for :func:`check_outputs`."""
    return _plan_for(_OUTPUT_PLANS, specs, "output")


def check_inputs(plan, inputs):
    """:func:`validate_inputs` with the specs' plan (:func:`input_plan`), which a caller
    that checks every call (a model) holds."""
    bindings = {}
    return plan.check(inputs, bindings), bindings


def check_outputs(plan, outputs, bindings):
    """:func:`validate_outputs` with the specs' plan (:func:`output_plan`)."""
    return plan.check(outputs, dict(bindings), bindings)


def validate_inputs(specs, inputs):
    """Check ``inputs`` (a mapping name -> array) against ``specs``.

    Returns ``(arrays, bindings)``: arrays by name (the caller's numpy arrays, torch tensors
    as no-copy numpy views, strings as kind "U" arrays) and the size of each symbol.
    Raises SpecError naming the tensor and what was expected vs got.
    """
    return check_inputs(input_plan(specs), inputs)


def validate_outputs(specs, outputs, bindings):
    """Check what a model returned against ``specs``; symbols must agree with ``bindings``
    (from :func:`validate_inputs`). Returns the output arrays by name, without copying."""
    return check_outputs(output_plan(specs), outputs, bindings)


def check_shape(spec, shape, role="input"):
    """Check a concrete shape (a tuple of ints) against one spec; SpecError if it does not fit.
    For callers that allocate before they have an array, e.g. ``Model.empty``."""
    try:
        shape = tuple(operator.index(size) for size in shape)
        # A zero-stride view of any shape costs no memory and runs the one check path.
        probe = np.broadcast_to(np.empty((), spec.numpy_dtype), shape)
    except (TypeError, ValueError):
        raise SpecError(f"{role} {spec.name!r}: shape must be a tuple of ints >= 0, "
                        f"got {shape!r}") from None
    _Plan((spec,), role).check({spec.name: probe}, {})


def _check_each(plan, values, sizes, bound_by_inputs=None):
    """The one check loop: names, then per tensor conversion, dtype, rank, dims, symbols."""
    if type(values) is not dict and not isinstance(values, Mapping):
        _raise_not_a_mapping(plan, values)
    if len(values) != plan.count:
        _raise_name_mismatch(plan, values)
    arrays = {}
    try:
        for name, as_is_type, dtype, rank, fixed_dims, fixed_sizes, symbols, check in plan.rows:
            array = values[name]
            if type(array) is not as_is_type:
                array = _to_array(check, array)
            if array.dtype is not dtype and not _dtype_matches(check, array.dtype):
                _raise_dtype(check, array)
            shape = array.shape
            if len(shape) != rank or fixed_dims(shape) != fixed_sizes:
                _raise_shape(check, shape)
            for index, symbol in symbols:
                if sizes.setdefault(symbol, shape[index]) != shape[index]:
                    raise _SymbolConflict(check, index, symbol, sizes[symbol], shape[index])
            arrays[name] = array
    except KeyError:
        _raise_name_mismatch(plan, values)
    except _SymbolConflict as conflict:
        raise _symbol_error(conflict, _binder(plan.checks, conflict, bound_by_inputs)) from None
    return arrays


# --- failure path: wording of the errors -------------------------------------------------

def _raise_name_mismatch(plan, values):
    missing = plan.names.difference(values.keys())
    unknown = set(values.keys()).difference(plan.names)
    parts = []
    if missing:
        parts.append(f"missing {plan.role} {_name_list(missing)}")
    if unknown:
        parts.append(f"unknown {plan.role} {_name_list(unknown)}")
    raise SpecError("; ".join(parts) + f" (expected {_name_list(plan.names)})") from None


def _raise_not_a_mapping(plan, values):
    got, expected = type(values).__name__, _name_list(plan.names)
    if plan.role == "output":
        raise SpecError(f"the model returned {got}; expected a dict of outputs {expected}")
    raise SpecError(f"inputs must be a mapping of name to tensor, got {got} (expected {expected})")


def _name_list(names):
    return ", ".join(sorted(map(repr, names)))


def _raise_dtype(check, array):
    raise SpecError(f"{check.role} {check.name!r}: expected dtype {check.spec.dtype}, "
                    f"got {_dtype_name(array.dtype)}")


def _raise_shape(check, shape):
    spec_shape = check.spec.shape
    if len(shape) != check.rank:
        raise SpecError(f"{check.role} {check.name!r}: expected rank {check.rank} "
                        f"(shape {spec_shape}), got rank {len(shape)} (shape {shape})")
    index = next(i for i, size in enumerate(spec_shape) if type(size) is int and shape[i] != size)
    raise SpecError(f"{check.role} {check.name!r}: dim {index} expected size "
                    f"{spec_shape[index]}, got {shape[index]} (spec shape {spec_shape}, "
                    f"got {shape})")


def _dtype_matches(check, dtype):
    # Equal but not identical dtype objects are fine; strings match any width of kind "U".
    return dtype.kind == "U" if check.is_string else dtype == check.dtype


def _dtype_name(dtype):
    if dtype.kind == "U":
        return "string"
    if dtype.byteorder not in "=|" and dtype.newbyteorder("=") in _NUMPY_DTYPES.values():
        return f"{dtype.newbyteorder('=').name} in non-native byte order ({dtype.str})"
    return dtype.name


def _binder(checks, conflict, bound_by_inputs):
    """Where a conflicting symbol got its size first: a tensor of this call, or the inputs."""
    if bound_by_inputs and conflict.symbol in bound_by_inputs:
        return "the inputs"
    for check in checks:
        for index, symbol in check.symbols:
            if symbol == conflict.symbol:
                return f"{check.role} {check.name!r} dim {index}"
    raise AssertionError("a symbol conflict always has a binder")  # pragma: no cover


def _symbol_error(conflict, binder):
    return SpecError(f"{conflict.check.role} {conflict.check.name!r}: dim {conflict.index} is "
                     f"symbol {conflict.symbol!r} = {conflict.got}, but {conflict.symbol!r} = "
                     f"{conflict.bound} from {binder}")


# --- conversions (never on the plain-ndarray success path) ------------------------------

def _to_array(check, value):
    if check.is_string:
        return _to_string_array(check, value)
    if type(value).__module__.startswith("torch"):
        return _torch_to_numpy(check, value)
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    raise SpecError(f"{check.role} {check.name!r}: expected a numpy array or CPU torch tensor "
                    f"of {check.spec.dtype}, got {type(value).__name__}")


def _torch_to_numpy(check, tensor):
    # torch is necessarily imported already: the value is a torch object.
    if getattr(tensor, "device", None) is None or tensor.device.type != "cpu":
        where = getattr(tensor, "device", type(tensor).__name__)
        raise SpecError(f"{check.role} {check.name!r}: expected a CPU tensor, got one on {where}")
    try:
        return tensor.detach().numpy()
    except (TypeError, RuntimeError) as error:
        raise SpecError(f"{check.role} {check.name!r}: torch tensor of {tensor.dtype} has no "
                        f"numpy view ({error}); expected {check.spec.dtype}") from None


def _to_string_array(check, value):
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        # Native byte order, as the arena carries strings (ope/bridge/protocol.py).
        return value if value.dtype.isnative else value.astype(value.dtype.newbyteorder("="))
    if isinstance(value, np.ndarray) and value.dtype == object \
            or isinstance(value, (str, list, tuple)):
        objects = np.array(value, dtype=object)
        for item in objects.flat:
            if not isinstance(item, str):
                raise SpecError(f"{check.role} {check.name!r}: expected str elements for a "
                                f"string tensor, got {type(item).__name__} ({item!r})")
        return objects.astype(str)
    got = _dtype_name(value.dtype) if isinstance(value, np.ndarray) else type(value).__name__
    raise SpecError(f"{check.role} {check.name!r}: expected dtype string (a str, a nested list of "
                    f"str or a numpy str array), got {got}")
