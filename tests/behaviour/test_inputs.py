"""Inputs stay what the caller sent: a model can neither change them nor see them change.

A model that writes into an input in place (torch ignores numpy's read-only flag) gets
InputWriteError naming the input, in both modes, and the caller's array, an arena buffer and a
sealed buffer keep their values; the model stays usable and later calls read the right bytes.
A model that keeps an input past its call keeps the values of that call, even after the arena
reuses the block for other calls.
"""

import os
from typing import Dict

import numpy as np
import pytest
import torch

import ope
from ope import TensorSpec

import models

pytestmark = models.USES_TORCHSCRIPT

# Input "write" picks what the model does: 0 nothing, 1 mul_(2), 2 relu_, 3 sub_(mean), 4 the
# write and then an exception of its own.
_EAGER_SOURCE = '''
import torch


def factory(data_dir):
    def run(x, write):
        kind = int(write)
        if kind == 1:
            x.mul_(2)
        elif kind == 2:
            torch.relu_(x)
        elif kind == 3:
            x.sub_(x.mean())
        elif kind == 4:
            x.add_(100)
            raise RuntimeError("wrote, then failed")
        return {"y": x + 1}
    return run
'''


class InPlace(torch.nn.Module):
    def forward(self, x: torch.Tensor, write: torch.Tensor) -> Dict[str, torch.Tensor]:
        kind = int(write)
        if kind == 1:
            x.mul_(2)
        elif kind == 2:
            torch.relu_(x)
        elif kind == 3:
            x.sub_(x.mean())
        return {"y": x + 1}


_SPECS = dict(inputs=[TensorSpec("x", "float32", ("n",)), TensorSpec("write", "int32", ())],
              outputs=[TensorSpec("y", "float32", ("n",))])


@pytest.fixture(scope="module")
def writers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("writers"))
    return {
        "eager": models.numpy_package(root, _EAGER_SOURCE, name="eager-writer",
                                      framework="torch", **_SPECS).path,
        "torchscript": ope.package_torchscript(os.path.join(root, "ts-writer"),
                                               torch.jit.script(InPlace()), name="ts-writer",
                                               **_SPECS).path,
    }


@pytest.fixture(params=["eager", "torchscript"])
def writer(request, writers, load_model):
    return load_model(writers[request.param])


def _call(model, x, write):
    return model.infer({"x": x, "write": np.array(write, np.int32)})["y"]


@pytest.mark.parametrize("write", [1, 2, 3])
def test_writing_into_an_input_is_input_write_error_and_the_callers_array_stays(writer, write):
    x = np.array([-1.0, 2.0, 3.0], np.float32)
    with pytest.raises(ope.InputWriteError, match="'x' in place") as raised:
        _call(writer, x, write)
    assert isinstance(raised.value, ope.ModelError)
    np.testing.assert_array_equal(x, [-1.0, 2.0, 3.0])
    np.testing.assert_array_equal(_call(writer, x, 0), [0.0, 3.0, 4.0])  # still usable


def test_a_sealed_buffer_never_changes_whatever_the_model_does(writer):
    sealed = writer.seal(_filled(writer.empty("x", (4,)), 10.0))
    for _ in range(3):
        with pytest.raises(ope.InputWriteError):
            _call(writer, sealed, 1)
        np.testing.assert_array_equal(sealed, np.full(4, 10.0))
        np.testing.assert_array_equal(_call(writer, sealed, 0), np.full(4, 11.0))


def test_an_arena_buffer_keeps_its_values_and_stays_writable_after_a_refused_write(writer):
    buffer = _filled(writer.empty("x", (4,)), 5.0)
    with pytest.raises(ope.InputWriteError):
        _call(writer, buffer, 2)
    np.testing.assert_array_equal(buffer, np.full(4, 5.0))
    buffer[:] = -3.0  # writable again once the call is over
    np.testing.assert_array_equal(_call(writer, buffer, 0), np.full(4, -2.0))


def test_after_a_write_and_an_error_later_calls_read_the_callers_bytes(load_model, writers):
    """The model wrote into its input and raised: the worker must not keep serving the
    private copy of those pages to the calls that reuse the buffer."""
    model = load_model(writers["eager"])
    buffer = _filled(model.empty("x", (1024,)), 1.0)
    with pytest.raises(ope.ModelError, match="wrote, then failed"):
        _call(model, buffer, 4)
    np.testing.assert_array_equal(buffer, np.ones(1024))
    for value in (1.0, 7.0, -2.0):
        buffer[:] = value
        np.testing.assert_array_equal(_call(model, buffer, 0), np.full(1024, value + 1))


def _filled(array, value):
    array[...] = value
    return array


# -- inputs kept past the call --------------------------------------------------------------

_KEEPER_SOURCE = '''
import numpy as np


def factory(data_dir):
    kept = {}

    def run(x, keep):
        if int(keep) == 1:
            kept["x"] = x  # the input array itself
        elif int(keep) == 2:
            kept["x"] = x[1:]  # a view of it
        first = kept.get("x", x)
        return {"y": np.array([first[0], first[-1], x[0]], np.float32)}
    return run
'''

_TORCH_KEEPER_SOURCE = '''
import torch


def factory(data_dir):
    kept = {}

    def run(x, keep):
        if int(keep):
            kept["x"] = x.view(-1)  # a tensor over the input's memory
        first = kept.get("x", x)
        return {"y": torch.stack([first[0], first[-1], x[0]])}
    return run
'''


@pytest.fixture(scope="module")
def keepers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("keepers"))
    specs = dict(inputs=[TensorSpec("x", "float32", ("n",)), TensorSpec("keep", "int32", ())],
                 outputs=[TensorSpec("y", "float32", (3,))])
    return {
        "numpy": models.numpy_package(root, _KEEPER_SOURCE, name="keeper", **specs).path,
        "torch": models.numpy_package(root, _TORCH_KEEPER_SOURCE, name="torch-keeper",
                                      framework="torch", **specs).path,
    }


@pytest.mark.parametrize("kind,keep", [("numpy", 1), ("numpy", 2), ("torch", 1)])
def test_an_input_kept_past_its_call_keeps_that_calls_values(load_model, mode, keepers, kind,
                                                             keep):
    """Calls of 256 KiB through a 1 MiB arena: the ring hands the kept input's block to later
    calls within a few calls, which out of process would rewrite what the model kept."""
    model = load_model(keepers[kind], **({"arena_mb": 1} if mode == "out_of_process" else {}))
    n = 64 * 1024
    first = _call_keep(model, np.full(n, 1.0, np.float32), keep)
    np.testing.assert_array_equal(first, [1.0, 1.0, 1.0])
    for value in range(2, 14):
        got = _call_keep(model, np.full(n, float(value), np.float32), 0)
        np.testing.assert_array_equal(got, [1.0, 1.0, value])


def test_an_arena_buffer_kept_by_the_model_keeps_the_values_of_its_call(load_model, keepers):
    """Out of process the kept buffer is frozen at the call's values; the caller's buffer
    itself goes on changing, as it is the caller's."""
    model = load_model(keepers["numpy"])
    buffer = _filled(model.empty("x", (8,)), 3.0)
    _call_keep(model, buffer, 1)
    buffer[:] = 4.0
    got = _call_keep(model, np.full(8, 5.0, np.float32), 0)
    if model.health()["mode"] == "out_of_process":
        np.testing.assert_array_equal(got, [3.0, 3.0, 5.0])
    else:  # in process the model holds a view of the caller's own buffer
        np.testing.assert_array_equal(got, [4.0, 4.0, 5.0])


def _call_keep(model, x, keep):
    return model.infer({"x": x, "keep": np.array(keep, np.int32)})["y"]
