"""Outputs a python model writes into: a numpy model whose callable takes an ``out`` keyword
(detected when the package loads) is called with ``out={name: array}``, one empty array per
output, and its outputs are those arrays unless it returns others. This needs every output's
shape to follow from the inputs' (fixed sizes, or symbols an input spec names) and no string
outputs; otherwise the model is called without ``out``.

Out of process the arrays are made while the worker's memory hook is installed, so they lie
in the worker's ring and travel by reference; a block the caller still holds from an earlier
call is stepped over by the ring, and its bytes are never written again (ope/bridge/ring.py).
"""

import inspect

import numpy as np

__all__ = ["OutArrays", "out_arrays_for"]


def _takes_out(model):
    try:
        parameter = inspect.signature(model).parameters.get("out")
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def out_arrays_for(package, model):
    """An :class:`OutArrays` for ``model`` of ``package`` if it takes ``out`` and every output
    shape follows from the inputs; else None."""
    if not _takes_out(model) or any(spec.name == "out" for spec in package.inputs):
        return None
    axes = {}  # symbol -> (input name, axis) that gives its size
    for spec in package.inputs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                axes.setdefault(dim, (spec.name, axis))
    plan = []
    for spec in package.outputs:
        if spec.dtype == "string" or any(dim is None or (isinstance(dim, str) and dim not in axes)
                                         for dim in spec.shape):
            return None
        plan.append((spec.name, spec.numpy_dtype,
                     tuple(dim if isinstance(dim, int) else axes[dim] for dim in spec.shape)))
    return OutArrays(plan)


class OutArrays:
    """Makes a call's ``out`` arrays from its (checked) inputs."""

    __slots__ = ("plan",)

    def __init__(self, plan):
        self.plan = plan  # (output name, dtype, dims: int or (input name, axis))

    def make(self, inputs):
        return {name: np.empty(tuple(d if type(d) is int else inputs[d[0]].shape[d[1]] for d in dims),
                               dtype)
                for name, dtype, dims in self.plan}
