"""The one reading of a ``device`` string, shared by the host (which GPU a worker sees,
ope/envs/devices.py) and the runners (where a model and its inputs go)."""

import re

__all__ = ["cuda_index"]

_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")


def cuda_index(device):
    """The GPU index ``device`` names ("cuda" is GPU 0), or None for the CPU ("cpu" or None).
    ValueError for anything else."""
    match = _DEVICE.fullmatch(str(device)) if device is not None else None
    if device is not None and not match:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device is None or device == "cpu":
        return None
    return int(match.group(1) or 0)
