"""Declares the C extension only; all other metadata lives in setup.cfg."""
from glob import glob

import numpy
from setuptools import Extension, setup

setup(
    ext_modules=[
        # numpy's C API makes the views of a call's tensors (and reads arrays) without going
        # through Python: numpy is a build requirement (pyproject.toml) as well as a dependency.
        # Hidden visibility: only PyInit__native is exported, so calls between the files are
        # direct calls, as within one file.
        Extension("ope_native._native", sources=sorted(glob("ope_native/src/*.c")),
                  depends=sorted(glob("ope_native/src/*.h")),
                  include_dirs=["ope_native/src", numpy.get_include()],
                  extra_compile_args=["-O2", "-fvisibility=hidden"]),
    ],
)
