"""Torch helpers of the torch runners (torchscript.py, torch_export.py, torch_package.py,
python.py with framework "torch"): importing torch with the runner's threads, the runner's
device, tensors over the call's arrays on that device, the check that the model left its
inputs alone, and the outputs back as numpy arrays."""

import warnings

import numpy as np

from ope.devices import cuda_index
from ope.errors import EnvError, InputWriteError, PackageError

__all__ = ["import_torch", "torch_device", "to_tensor", "check_inputs_untouched",
           "tensors_to_numpy"]


def import_torch(package, private_inputs, threads=None):
    """torch, its intra-op pool sized to ``threads`` when given."""
    try:
        import torch
    except ImportError:
        raise PackageError(f"package {package.name!r} needs torch, which is not "
                           f"installed") from None
    if private_inputs:
        # Torch warns that it cannot make a tensor over a read-only array read-only; over
        # private memory that is expected. Filtered once, in the worker only: a filter set
        # around every call would cost microseconds per call.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
    if threads:
        torch.set_num_threads(threads)
    return torch


def torch_device(torch, device):
    """The torch.device for a runner's ``device`` ("cpu", "cuda", "cuda:N"; None: the CPU).
    EnvError naming it when this process has no such GPU."""
    try:
        index = cuda_index(device)
    except ValueError as exc:
        raise EnvError(str(exc)) from None
    if index is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EnvError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU in this "
                       f"process")
    if index >= torch.cuda.device_count():
        raise EnvError(f"device {device!r}: this process sees {torch.cuda.device_count()} "
                       f"CUDA GPU(s)")
    return torch.device("cuda", index)


def to_tensor(torch, array, private, device=None):
    """A tensor for the model over ``array``'s memory if writes to it are ``private``, else over
    a copy; on ``device`` (a torch.device) when it is not the CPU."""
    if not private:
        tensor = torch.from_numpy(np.array(array))
    else:
        try:
            tensor = torch.from_numpy(array)
        except ValueError:  # negative strides: torch cannot view them, so this one is copied
            tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device is not None and device.type != "cpu":
        return tensor.to(device)
    return tensor


def check_inputs_untouched(package, arguments, torch):
    """InputWriteError naming the inputs the model wrote into: every in-place op bumps a
    tensor's version counter, which starts at 0 for the tensors made for the call."""
    written = [name for name, value in arguments.items()
               if isinstance(value, torch.Tensor) and value._version]
    if written:
        raise InputWriteError(
            f"model {package.name!r} wrote into its input{'s' * (len(written) > 1)} "
            f"{', '.join(map(repr, written))} in place: inputs are read-only, so the caller's "
            f"data is unchanged (copy an input before changing it, e.g. x.clone())",
            error_type="InputWriteError")


def tensors_to_numpy(torch, outputs):
    return {name: _tensor_to_numpy(torch, value) for name, value in outputs.items()}


def _tensor_to_numpy(torch, value):
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if value.device.type != "cpu":
        value = value.cpu()
    try:
        return value.numpy()
    except (TypeError, RuntimeError):
        return value  # e.g. bfloat16: validate_outputs names the output and its dtype
