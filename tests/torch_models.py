"""Models for the torch runners' tests: a torch.export program and an eager model in a
torch.package archive, each with a reference to compare ope's results with, built through the
public packaging API."""

import importlib
import os
import sys
import textwrap
import warnings

import numpy as np
import torch

import ope
from ope import TensorSpec

__all__ = ["Critic", "export_critic", "critic_reference", "CRITIC_INPUTS", "CRITIC_OUTPUTS",
           "MAX_BATCH", "torch_package_archive", "torch_package_model", "TORCH_PACKAGE_INPUTS",
           "TORCH_PACKAGE_OUTPUTS", "TRIP_ABORT", "TRIP_RAISE"]

MAX_BATCH = 16


class Critic(torch.nn.Module):
    """Returns a dict whose key order ("value", "advantage") differs from the output specs'
    order (advantage, value)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = torch.nn.Linear(4, 8)
        self.value_head = torch.nn.Linear(8, 1)
        self.advantage_head = torch.nn.Linear(8, 2)

    def forward(self, obs, scale):
        hidden = torch.tanh(self.body(obs)) * scale
        return {"value": self.value_head(hidden).squeeze(1),
                "advantage": self.advantage_head(hidden)}


CRITIC_INPUTS = [TensorSpec("obs", "float32", ("batch", 4)),
                 TensorSpec("scale", "float32", ("batch", 1))]
CRITIC_OUTPUTS = [TensorSpec("advantage", "float32", ("batch", 2)),
                  TensorSpec("value", "float32", ("batch",))]


def export_critic(batch=2, dynamic=True, as_keywords=False):
    """Critic exported with a batch of ``batch`` (a torch.export.Dim of 1..MAX_BATCH when
    ``dynamic``), its inputs passed by position or, ``as_keywords``, by keyword."""
    example = {"obs": torch.randn(batch, 4), "scale": torch.ones(batch, 1)}
    dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shapes = {"obs": {0: dim}, "scale": {0: dim}} if dynamic else None
    if as_keywords:
        return torch.export.export(Critic().eval(), (), kwargs=example, dynamic_shapes=shapes)
    return torch.export.export(Critic().eval(), (example["obs"], example["scale"]),
                               dynamic_shapes=shapes)


def critic_reference(inputs):
    """The eager Critic's outputs for numpy ``inputs``, as numpy."""
    with torch.no_grad():
        result = Critic().eval()(torch.from_numpy(inputs["obs"]),
                                 torch.from_numpy(inputs["scale"]))
    return {name: tensor.numpy() for name, tensor in result.items()}


TRIP_RAISE, TRIP_ABORT = 1, 2

_PACKAGED_SOURCE = '''
import os

import torch


class Tripwire(ValueError):
    pass


class Scorer(torch.nn.Module):
    """Scores x; ``trip`` 1 raises Tripwire, 2 aborts the process."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x, trip):
        if int(trip) == 1:
            raise Tripwire(f"tripped on a batch of {len(x)}")
        if int(trip) == 2:
            os.abort()
        return self.layer(x)
'''

TORCH_PACKAGE_INPUTS = [TensorSpec("x", "float32", ("batch", 3)), TensorSpec("trip", "int64", ())]
TORCH_PACKAGE_OUTPUTS = [TensorSpec("scores", "float32", ("batch", 2))]


def torch_package_archive(root, module="ope_test_scorer"):
    """A torch.package archive at root/scorer.package holding a pickled Scorer under
    ("scorer", "model.pkl"), and the eager Scorer it was made from."""
    source_dir = os.path.join(root, "scorer_src")
    os.makedirs(source_dir, exist_ok=True)
    with open(os.path.join(source_dir, f"{module}.py"), "w") as file:
        file.write(textwrap.dedent(_PACKAGED_SOURCE))
    sys.path.insert(0, source_dir)
    try:
        scorer = importlib.import_module(module).Scorer().eval()
        archive = os.path.join(root, "scorer.package")
        with torch.package.PackageExporter(archive) as exporter, warnings.catch_warnings():
            # torch.package pickles storages through an API torch itself deprecates
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            exporter.intern(module)
            exporter.extern(["torch", "torch.**"])
            exporter.save_pickle("scorer", "model.pkl", scorer)
    finally:
        sys.path.remove(source_dir)
        sys.modules.pop(module, None)
    return archive, scorer


def torch_package_model(root, name="scorer"):
    """ope package of the Scorer archive, self-checked; returns (package, eager Scorer)."""
    archive, scorer = torch_package_archive(root)
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    with torch.no_grad():
        scores = scorer(torch.from_numpy(x), torch.tensor(0)).numpy()
    package = ope.package_torch_package(
        os.path.join(root, name), archive, "scorer", "model.pkl", name=name,
        inputs=TORCH_PACKAGE_INPUTS, outputs=TORCH_PACKAGE_OUTPUTS,
        test_inputs={"x": x, "trip": np.int64(0)},
        test_outputs={"scores": scores})
    return package, scorer
