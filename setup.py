"""Declares the C extension only; all other metadata lives in setup.cfg."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("ope_native._native", sources=["ope_native/_native.c"], extra_compile_args=["-O2"]),
    ],
)
