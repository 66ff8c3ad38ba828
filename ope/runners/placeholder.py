"""The placeholder runner: random outputs of the spec'd dtypes and shapes, to wire a system up
before its models exist."""

import numpy as np

from ope.runners.base import Runner

__all__ = ["PlaceholderRunner"]


class PlaceholderRunner(Runner):
    """Random outputs of the spec'd dtypes; symbols take their sizes from the inputs, other
    free dims are 1."""

    def __init__(self, package, *options):
        super().__init__(package, *options)
        self._random = np.random.default_rng()

    def run(self, inputs):
        sizes = {}
        for spec in self.package.inputs:
            for index, dim in enumerate(spec.shape):
                if isinstance(dim, str):
                    sizes.setdefault(dim, inputs[spec.name].shape[index])
        return {spec.name: self._random_array(spec, sizes) for spec in self.package.outputs}

    def _random_array(self, spec, sizes):
        shape = tuple(dim if isinstance(dim, int) else sizes.get(dim, 1) for dim in spec.shape)
        dtype = spec.numpy_dtype
        if spec.dtype == "string":
            return np.full(shape, "placeholder")
        if dtype.kind == "f":
            return self._random.standard_normal(shape).astype(dtype)
        if dtype.kind == "b":
            return self._random.integers(0, 2, shape).astype(bool)
        return self._random.integers(0, 100, shape, dtype=dtype)
