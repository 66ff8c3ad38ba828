"""Builders of the model packages the tests load: real models of every kind, plus a probe
whose misbehaviour (wrong dtype, missing output, raising, ...) a test selects per call.

Packages are built through the public packaging API, so building them also tests it.
"""

import os
import textwrap
from typing import Dict

import numpy as np
import pytest
import torch

import ope
from ope import TensorSpec

__all__ = ["write_code", "numpy_package", "echo_package", "probe_package", "affine_package",
           "torchscript_package", "eager_torch_package", "placeholder_package",
           "unruly_package", "GatedPolicy", "PROBE_BEHAVIOURS", "UNRULY_EXCEPTIONS",
           "USES_TORCHSCRIPT"]

# torch deprecates TorchScript; ope runs it on purpose, so the test modules that use it (and
# only those) mark themselves with this, silencing its notices.
USES_TORCHSCRIPT = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def write_code(root, source, module="model"):
    """A code dir holding ``source`` as ``<module>.py``; returns its path."""
    code_dir = os.path.join(root, f"{module}_src")
    os.makedirs(code_dir, exist_ok=True)
    with open(os.path.join(code_dir, f"{module}.py"), "w") as file:
        file.write(textwrap.dedent(source))
    return code_dir


def numpy_package(root, source, *, name, inputs, outputs, module="model", **options):
    """Package ``source`` (defining ``factory``) as a numpy python package at root/name."""
    work = os.path.join(root, f"{name}-build")
    return ope.package_python(os.path.join(root, name), name=name,
                              code_dir=write_code(work, source, module),
                              entrypoint=f"{module}:factory", inputs=inputs, outputs=outputs,
                              **options)


_ECHO_SOURCE = '''
def factory(data_dir):
    def echo(**inputs):
        return {"echo_" + name: value for name, value in inputs.items()}
    return echo
'''


def echo_package(root, inputs, name="echo"):
    """Returns each input as output "echo_<name>" with the same spec: isolates input rules."""
    outputs = [TensorSpec("echo_" + spec.name, spec.dtype, spec.shape) for spec in inputs]
    return numpy_package(root, _ECHO_SOURCE, name=name, inputs=inputs, outputs=outputs)


PROBE_BEHAVIOURS = ("ok", "wrong_dtype", "wrong_rank", "wrong_fixed_dim", "wrong_symbol",
                    "missing_output", "extra_output", "not_a_dict", "raise", "list_output")

_PROBE_SOURCE = '''
import numpy as np


class ProbeFailure(ValueError):
    pass


def explode(x):
    raise ProbeFailure(f"probe asked to fail on {x.shape}")


def factory(data_dir):
    def probe(x, behaviour):
        y = x * 2
        label = np.array(["ok"] * len(x))
        outputs = {
            "ok": {"y": y, "label": label},
            "wrong_dtype": {"y": y.astype(np.float64), "label": label},
            "wrong_rank": {"y": y[None], "label": label},
            "wrong_fixed_dim": {"y": np.zeros((len(x), 3), np.float32), "label": label},
            "wrong_symbol": {"y": np.zeros((len(x) + 1, 2), np.float32), "label": label},
            "missing_output": {"y": y},
            "extra_output": {"y": y, "label": label, "z": y},
            "list_output": {"y": y, "label": ["ok"] * len(x)},
        }
        if str(behaviour) == "raise":
            explode(x)
        if str(behaviour) == "not_a_dict":
            return 3
        return outputs[str(behaviour)]
    return probe
'''


def probe_package(root):
    """x: float32 (n, 2), behaviour: string () -> y: float32 (n, 2), label: string (n,)."""
    return numpy_package(
        root, _PROBE_SOURCE, name="probe",
        inputs=[TensorSpec("x", "float32", ("n", 2)), TensorSpec("behaviour", "string", ())],
        outputs=[TensorSpec("y", "float32", ("n", 2)), TensorSpec("label", "string", ("n",))])


# What the unruly model raises, by the value of its input "kind" (0: no exception).
UNRULY_EXCEPTIONS = {"huge_message": 1, "lone_surrogate": 2, "str_raises": 3,
                     "huge_traceback": 4}

_UNRULY_SOURCE = '''
class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text for this exception")


def ping(depth):
    if depth == 0:
        raise ValueError("deep down")
    pong(depth - 1)


def pong(depth):
    ping(depth)  # alternating frames: the traceback module cannot fold them as a repeat


def factory(data_dir):
    def run(kind):
        if kind == 1:
            raise ValueError("start " + "m" * 300_000 + " end")
        if kind == 2:
            raise ValueError("bad \\udc80 byte")
        if kind == 3:
            raise Unprintable()
        if kind == 4:
            ping(300)
        return {"echo": kind}
    return run
'''


def unruly_package(root, name="unruly"):
    """kind: int32 () -> echo: int32 (); raises the exception UNRULY_EXCEPTIONS names for
    ``kind``: a 300 kB message, a lone surrogate, a ``__str__`` that raises, a deep traceback."""
    return numpy_package(root, _UNRULY_SOURCE, name=name,
                         inputs=[TensorSpec("kind", "int32", ())],
                         outputs=[TensorSpec("echo", "int32", ())])


_AFFINE_SOURCE = '''
import os

import numpy as np


def factory(data_dir):
    weight = np.load(os.path.join(data_dir, "weight.npy"))
    bias = np.load(os.path.join(data_dir, "bias.npy"))

    def affine(x):
        return {"y": (x @ weight + bias).astype(np.float32)}
    return affine
'''


def affine_reference(x):
    weight, bias = _affine_parameters()
    return (x @ weight + bias).astype(np.float32)


def _affine_parameters():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)


def affine_package(root, name="affine", **options):
    """numpy model with a data dir: y = x @ W + b, x (batch, 4) -> y (batch, 3)."""
    data_dir = os.path.join(root, f"{name}-data")
    os.makedirs(data_dir)
    weight, bias = _affine_parameters()
    np.save(os.path.join(data_dir, "weight.npy"), weight)
    np.save(os.path.join(data_dir, "bias.npy"), bias)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    options.setdefault("test_inputs", {"x": x})
    options.setdefault("test_outputs", {"y": affine_reference(x)})
    return numpy_package(root, _AFFINE_SOURCE, name=name, data_dir=data_dir,
                         inputs=[TensorSpec("x", "float32", ("batch", 4))],
                         outputs=[TensorSpec("y", "float32", ("batch", 3))], **options)


class GatedPolicy(torch.nn.Module):
    """Data-dependent control flow: rows whose score is positive go through a second layer,
    and the number of refinement loops depends on the input values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(4, 8)
        self.second = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, obs: torch.Tensor, gain: torch.Tensor) -> Dict[str, torch.Tensor]:
        hidden = torch.relu(self.first(obs)) * gain
        loops = 0
        while bool(hidden.abs().max() > 1.0) and loops < 10:
            hidden = hidden / 2
            loops += 1
        if bool(hidden.sum() > 0):
            hidden = torch.relu(self.second(hidden))
        return {"logits": self.head(hidden), "loops": torch.tensor(loops)}


def torchscript_package(root, name="gated", with_test_data=True):
    """TorchScript (torch.jit.script) of GatedPolicy: obs float32 (batch, 4), gain float32
    () -> logits float32 (batch, 2), loops int64 ()."""
    eager = GatedPolicy().eval()
    obs = torch.linspace(-3, 3, 12).reshape(3, 4)
    gain = torch.tensor(5.0)
    options = {}
    if with_test_data:
        with torch.no_grad():
            expected = eager(obs, gain)
        options = dict(test_inputs={"obs": obs, "gain": gain},
                       test_outputs={k: v.numpy() for k, v in expected.items()})
    return ope.package_torchscript(
        os.path.join(root, name), torch.jit.script(eager), name=name,
        inputs=[TensorSpec("obs", "float32", ("batch", 4)), TensorSpec("gain", "float32", ())],
        outputs=[TensorSpec("logits", "float32", ("batch", 2)),
                 TensorSpec("loops", "int64", ())], **options)


_EAGER_TORCH_SOURCE = '''
import torch


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x, mask):
        assert isinstance(x, torch.Tensor) and isinstance(mask, torch.Tensor)
        return torch.where(mask[:, None], self.layer(x), torch.zeros(()))


def factory(data_dir):
    net = TinyNet().eval()
    return lambda x, mask: {"y": net(x, mask)}
'''


def eager_torch_reference(x, mask):
    torch.manual_seed(1)
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        return torch.where(torch.from_numpy(mask)[:, None], layer(torch.from_numpy(x)),
                           torch.zeros(())).numpy()


def eager_torch_package(root, name="eager"):
    """Eager PyTorch code as framework="torch": x float32 (batch, 3), mask bool (batch,)
    -> y float32 (batch, 2)."""
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    mask = np.array([True, False])
    return numpy_package(root, _EAGER_TORCH_SOURCE, name=name, framework="torch",
                         inputs=[TensorSpec("x", "float32", ("batch", 3)),
                                 TensorSpec("mask", "bool", ("batch",))],
                         outputs=[TensorSpec("y", "float32", ("batch", 2))],
                         test_inputs={"x": x, "mask": mask},
                         test_outputs={"y": eager_torch_reference(x, mask)})


def placeholder_package(root, name="placeholder"):
    """Placeholder covering numeric, bool and string outputs, bound and free dims."""
    return ope.package_placeholder(
        os.path.join(root, name), name=name,
        inputs=[TensorSpec("x", "float32", ("batch", 4))],
        outputs=[TensorSpec("scores", "float32", ("batch", 3)),
                 TensorSpec("ids", "int32", ("batch", None)),
                 TensorSpec("flags", "bool", (2,)),
                 TensorSpec("names", "string", ("batch",))])
