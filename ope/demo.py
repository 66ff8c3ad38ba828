"""``ope demo``: the main job end to end, on a small control pipeline.

Two models are packaged, each with test data so packaging self-checks it: a numpy
observation normaliser (Python code plus data files) and an actor-critic policy exported
with ``torch.export`` (a dynamic batch dim), whose forward pass refines each row's hidden
state until it settles, as masked tensor ops that export keeps. Both are loaded with
``ope.load`` in the default mode and run on a batch of observations; the outputs are
printed. Packages live in a temporary folder that is removed afterwards.
"""

import os
import tempfile
import textwrap
from typing import Dict

import numpy as np
import torch

import ope

__all__ = ["main"]

OBSERVATIONS = ("cart_pos", "cart_vel", "pole_angle", "pole_vel")
ACTIONS = ("push_left", "hold", "push_right")
HIDDEN = 32
MAX_REFINE_STEPS = 8
_TICKS = 50

_NORMALISER_CODE = '''
"""Observation normaliser: (raw - mean) / std from recorded statistics, clipped to +-5."""
import os

import numpy as np


def make_normaliser(data_dir):
    mean = np.load(os.path.join(data_dir, "mean.npy"))
    std = np.load(os.path.join(data_dir, "std.npy"))

    def normalise(raw):
        return {"obs": np.clip((raw - mean) / std, -5.0, 5.0).astype(np.float32)}

    return normalise
'''


class PolicyNet(torch.nn.Module):
    """Actor-critic policy: encode, refine until the hidden state settles (per row, at most
    MAX_REFINE_STEPS times), then action probabilities and a value estimate."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(len(OBSERVATIONS), HIDDEN)
        self.refine = torch.nn.Linear(HIDDEN, HIDDEN)
        self.actor = torch.nn.Linear(HIDDEN, len(ACTIONS))
        self.critic = torch.nn.Linear(HIDDEN, 1)

    def forward(self, obs: torch.Tensor) -> Dict[str, torch.Tensor]:
        hidden = torch.tanh(self.encoder(obs))
        steps = torch.zeros(obs.shape[0], dtype=torch.int64)
        # A settled row stays settled (its hidden state no longer changes), so every step
        # runs on the whole batch, masked: no data-dependent branch for export to refuse.
        for _ in range(MAX_REFINE_STEPS):
            update = torch.tanh(self.refine(hidden)) - hidden
            unsettled = update.abs().amax(dim=1) > 0.2
            hidden = torch.where(unsettled.unsqueeze(1), hidden + 0.5 * update, hidden)
            steps += unsettled.long()
        return {"action_probs": torch.softmax(self.actor(hidden), dim=1),
                "value": self.critic(hidden).squeeze(1),
                "refine_steps": steps}


def main():
    """Run the demo; returns the exit status."""
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    torch.set_num_threads(1)
    recorded = rng.normal([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.2, 1.5], (256, 4)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="ope-demo-") as workdir:
        normaliser = _package_normaliser(workdir, recorded)
        policy = _package_policy(workdir, _normalise_like(recorded[:8], recorded),
                                 training_obs=_normalise_like(recorded, recorded))
        batch = rng.normal([0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.2, 1.5], (6, 4)).astype(np.float32)
        _run_pipeline(normaliser.path, policy.path, batch)
    return 0


def _normalise_like(raw, recorded):
    return np.clip((raw - recorded.mean(0)) / recorded.std(0), -5.0, 5.0).astype(np.float32)


def _package_normaliser(workdir, recorded):
    code_dir = os.path.join(workdir, "normaliser_src")
    data_dir = os.path.join(workdir, "normaliser_data")
    os.makedirs(os.path.join(code_dir, "normaliser"))
    os.makedirs(data_dir)
    with open(os.path.join(code_dir, "normaliser", "__init__.py"), "w") as file:
        file.write(textwrap.dedent(_NORMALISER_CODE))
    np.save(os.path.join(data_dir, "mean.npy"), recorded.mean(0))
    np.save(os.path.join(data_dir, "std.npy"), recorded.std(0))
    sample = recorded[:8]
    package = ope.package_python(
        os.path.join(workdir, "normaliser"), name="obs-normaliser", code_dir=code_dir,
        entrypoint="normaliser:make_normaliser", data_dir=data_dir, framework="numpy",
        inputs=[ope.TensorSpec("raw", "float32", ("batch", len(OBSERVATIONS)))],
        outputs=[ope.TensorSpec("obs", "float32", ("batch", len(OBSERVATIONS)))],
        test_inputs={"raw": sample}, test_outputs={"obs": _normalise_like(sample, recorded)})
    _describe_package(package)
    return package


def _expert_actions(obs):
    """A hand-written controller to imitate: push the way the pole falls, else hold."""
    lean = obs[:, 2] + 0.3 * obs[:, 3]
    return torch.where(lean > 0.25, 2, torch.where(lean < -0.25, 0, 1))


def _train_policy(obs):
    """Imitation-train the policy for a moment, so the demo's decisions mean something.
    Seeded, single-threaded: the same weights on every run."""
    policy = PolicyNet()
    optimiser = torch.optim.Adam(policy.parameters(), lr=0.02)
    obs = torch.from_numpy(obs)
    targets = _expert_actions(obs)
    for _ in range(100):
        optimiser.zero_grad()
        loss = torch.nn.functional.nll_loss(torch.log(policy(obs)["action_probs"]), targets)
        loss.backward()
        optimiser.step()
    return policy.eval()


def _package_policy(workdir, normaliser_outputs, training_obs):
    eager = _train_policy(training_obs)
    with torch.no_grad():
        reference = eager(torch.from_numpy(normaliser_outputs))
    batch = torch.export.Dim("batch")
    program = torch.export.export(eager, (torch.from_numpy(normaliser_outputs),),
                                  dynamic_shapes={"obs": {0: batch}})
    package = ope.package_torch_export(
        os.path.join(workdir, "policy"), program, name="cartpole-policy",
        inputs=[ope.TensorSpec("obs", "float32", ("batch", len(OBSERVATIONS)))],
        outputs=[ope.TensorSpec("action_probs", "float32", ("batch", len(ACTIONS))),
                 ope.TensorSpec("value", "float32", ("batch",)),
                 ope.TensorSpec("refine_steps", "int64", ("batch",))],
        test_inputs={"obs": normaliser_outputs},
        test_outputs={name: tensor.numpy() for name, tensor in reference.items()})
    _describe_package(package)
    return package


def _describe_package(package):
    print(f"packaged {package.name!r} ({package.runner}) at {package.path}")
    for role, specs in (("in ", package.inputs), ("out", package.outputs)):
        for spec in specs:
            print(f"    {role} {spec.name:<13} {spec.dtype:<8} {list(spec.shape)}")
    print(f"    {len(package.files)} files hashed in the manifest; self-check against "
          f"stored test data passed")


def _run_pipeline(normaliser_path, policy_path, batch):
    with ope.load(normaliser_path) as normaliser, ope.load(policy_path) as policy:
        print(f"\nloaded both packages ({policy.health().get('mode', 'out_of_process')}); "
              f"running a batch of {len(batch)} observations\n")
        for _ in range(_TICKS):  # a control loop calls the pipeline tick after tick
            obs = normaliser.infer({"raw": batch})["obs"]
            decision = policy.infer({"obs": obs})
        _print_table(batch, decision)
        for model in (normaliser, policy):
            stats = model.stats()
            print(f"{model.name}: {stats['calls']} calls, {stats['errors']} errors, latency "
                  f"p50 {stats['latency_p50_us']:.0f} µs, p99 {stats['latency_p99_us']:.0f} µs")


def _print_table(batch, decision):
    """One row per observation: what the policy saw and what it decided."""
    header = "  ".join(f"{name:>10}" for name in OBSERVATIONS)
    print(f"{header}  {'action':>10}  {'p':>5}  {'value':>7}  refine_steps")
    for row, probs, value, steps in zip(batch, decision["action_probs"], decision["value"],
                                        decision["refine_steps"]):
        observed = "  ".join(f"{x:>10.3f}" for x in row)
        best = int(np.argmax(probs))
        print(f"{observed}  {ACTIONS[best]:>10}  {probs[best]:>5.2f}  {value:>7.3f}  {steps:>12d}")
    print()
