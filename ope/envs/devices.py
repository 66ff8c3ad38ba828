"""Devices for a worker: what ``device="cuda:N"`` sets in its environment."""

import shutil
import subprocess

from ope.devices import cuda_index
from ope.errors import EnvError


def device_env_vars(device):
    """Environment variables that give a worker ``device``: "cpu" hides every GPU; "cuda" or
    "cuda:N" shows GPU N (nvidia-smi's index) alone, by UUID where nvidia-smi can tell it, so
    a CUDA_VISIBLE_DEVICES of the host does not renumber it."""
    index = cuda_index(device)
    if index is None:
        return {"CUDA_VISIBLE_DEVICES": ""}
    uuids = _gpu_uuids()
    if uuids is None:
        # Without nvidia-smi an index is all there is; PCI order is the order nvidia-smi uses.
        return {"CUDA_VISIBLE_DEVICES": str(index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    if index not in uuids:
        raise EnvError(f"device {device!r}: there is no GPU {index} (nvidia-smi lists "
                       f"{', '.join(map(str, sorted(uuids))) or 'none'})")
    return {"CUDA_VISIBLE_DEVICES": uuids[index]}


def _gpu_uuids():
    """{index: UUID} from nvidia-smi, or None where it is missing or fails."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return None
    try:
        done = subprocess.run([nvidia_smi, "--query-gpu=index,uuid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    rows = (line.split(",") for line in done.stdout.splitlines() if line.strip())
    return {int(index): uuid.strip() for index, uuid in rows}
