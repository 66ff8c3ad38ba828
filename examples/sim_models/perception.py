"""Perception model of the example simulation (numpy), packaged by examples/sim_job.py.

Each agent senses its nearest neighbour on a torus world (relative position and velocity,
distance), its own speed, and the direction to the world's centre: 8 features per agent,
scaled to about unit size so the policy network sees well-conditioned inputs.
"""

import json
import os

import numpy as np

FEATURES = 8


def factory(data_dir):
    with open(os.path.join(data_dir, "world.json")) as file:
        size = float(json.load(file)["size"])
    centre = np.float32(size / 2)

    def wrap(delta):
        # shortest displacement on the torus
        return delta - size * np.round(delta / size)

    def perceive(pos, vel):
        delta = wrap(pos[None, :, :] - pos[:, None, :])          # (agents, agents, 2)
        dist2 = np.einsum("ijk,ijk->ij", delta, delta)
        np.fill_diagonal(dist2, np.inf)
        nearest = np.argmin(dist2, axis=1)
        rows = np.arange(len(pos))
        to_centre = wrap(centre - pos)
        obs = np.empty((len(pos), FEATURES), np.float32)
        obs[:, 0:2] = delta[rows, nearest] / size
        obs[:, 2:4] = vel[nearest] - vel
        obs[:, 4] = np.sqrt(dist2[rows, nearest]) / size
        obs[:, 5] = np.linalg.norm(vel, axis=1)
        obs[:, 6:8] = to_centre / (np.linalg.norm(to_centre, axis=1, keepdims=True) + 1e-6)
        return {"obs": obs}
    return perceive
