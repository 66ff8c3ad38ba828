"""Declares the C extension only; all other metadata lives in setup.cfg."""
import numpy
from setuptools import Extension, setup

setup(
    ext_modules=[
        # numpy's C API makes the views of a call's tensors (and reads arrays) without going
        # through Python: numpy is a build requirement (pyproject.toml) as well as a dependency.
        Extension("ope_native._native", sources=["ope_native/_native.c"], extra_compile_args=["-O2"],
                  include_dirs=[numpy.get_include()]),
    ],
)
