"""Strict device mode: on a CPU machine, fail where a GPU run would put a tensor on the wrong device.

On a GPU every rank computes on ``cuda:N`` while a tensor made without ``device=`` lands in host
memory; NCCL refuses host tensors and an op that meets a CUDA tensor with a host tensor (other
than a 0-dim scalar) raises. On a CPU machine both are the same device, so the CPU suite cannot
see that class of defect, and the GPU machine we can test on has one GPU, so its collectives
never run there either. This mode restores the distinction on CPU:

- :func:`~.device.current_device` answers ``cuda:0``, what a GPU rank would use; the CPU
  runtime's mode maps it to the CPU as it does megatron-core's own CUDA arguments.
- Every tensor remembers where a GPU run would have put it, and a device tensor's ``.device``
  answers ``cuda:0``: a factory without ``device=``
  (``torch.tensor``, ``zeros``, ``from_numpy``...), ``.cpu()`` or ``.to("cpu")`` make a *host*
  tensor; a CUDA device argument, ``.cuda()`` or ``.to(current_device())`` a *device* tensor;
  every other op's result is host only when all its tensor inputs are. Parameters and tensors
  of unknown origin count as device tensors, so the mode never invents a defect.
- An op that combines a device tensor with a host tensor of one or more dimensions raises
  :class:`DeviceDisciplineError`, as CUDA would (copies and indexing excepted, as on CUDA).
- A host tensor given to a collective on a group that would be NCCL on GPUs raises too. Groups
  created with ``backend="gloo"`` (megatron-core's CPU-side groups) take host tensors, as they
  do on a GPU cluster. That check wraps torch.distributed, so it is a patch:
  ``patches/strict_collectives.py``, which also installs :class:`StrictDevices` into the CPU
  runtime's mode.

``SPANNORM_STRICT_DEVICES=1`` turns it on for a process (read when the CPU runtime is enabled,
i.e. at :func:`~.distributed.initialize`); the test suite runs the training loop under it. It is
a check, not a way to train: it costs a few microseconds per torch call.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten

from spannorm_megatron.config.environment import STRICT_DEVICES_ENV as STRICT_ENV

_HOST = "_spannorm_host"


class DeviceDisciplineError(RuntimeError):
    """A tensor is where a GPU run would refuse it (see the module docstring)."""


def strict_devices_requested() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def is_host(tensor) -> bool:
    """True for a tensor that a GPU run would hold in host memory."""
    return isinstance(tensor, torch.Tensor) and getattr(tensor, _HOST, False)


def _mark(outputs, host: bool) -> None:
    for out in tree_flatten(outputs)[0]:
        if isinstance(out, torch.Tensor) and not isinstance(out, torch.nn.Parameter):
            try:
                setattr(out, _HOST, host)
            except (AttributeError, RuntimeError):  # e.g. tensors of C++-only subclasses
                pass


# Factories place their result on `device=`, or in host memory when it is absent.
_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.from_numpy, torch.frombuffer,
    torch.zeros, torch.ones, torch.empty, torch.empty_strided, torch.full, torch.eye,
    torch.arange, torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint,
    torch.randperm, torch.normal,
}
# `*_like` and `new_*` follow their input unless `device=` says otherwise.
_FOLLOW_INPUT = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
    torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor,
}
# Ops that CUDA itself allows across devices: copies and (host) index tensors.
_MIX_ALLOWED = {
    torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.to,
    torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.index_put_, torch.Tensor.index_put,
    torch.Tensor.set_,
}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
_DEVICE_DESCRIPTOR = torch._C.TensorBase.__dict__["device"]  # `t.device` calls its __get__
_GPU_DEVICE = torch.device("cuda", 0)


def _placement(device, is_cuda: Callable) -> bool:
    """True (host) or False (device) for an explicit device argument."""
    if isinstance(device, torch.Tensor):
        return is_host(device)
    return not is_cuda(device)


def _to_target(args, kwargs):
    """The device argument of ``Tensor.to(...)``: a device, a tensor, or None (dtype only)."""
    if "device" in kwargs and kwargs["device"] is not None:
        return kwargs["device"]
    if len(args) > 1 and not isinstance(args[1], torch.dtype):
        return args[1]
    return None


def tensor_inputs(args, kwargs):
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def describe(tensor: torch.Tensor) -> str:
    return f"{'host' if is_host(tensor) else 'device'} tensor {tuple(tensor.shape)} {tensor.dtype}"


class StrictDevices:
    """The bookkeeping the CPU runtime's torch-function mode runs on every call
    (``patches/cpu_device_arguments.py``)."""

    def __init__(self, is_cuda: Callable):
        self._is_cuda = is_cuda

    def call(self, func, args, kwargs, run):
        """Run ``run(func, args, kwargs)`` and record where its outputs would live."""
        if getattr(func, "__self__", None) is _DEVICE_DESCRIPTOR and not is_host(args[0]):
            # `device=t.device` must carry a device tensor's placement on, as it does on a GPU.
            return _GPU_DEVICE
        host = self._requested(func, args, kwargs)
        if host is None:
            inputs = tensor_inputs(args, kwargs)
            hosts = [t for t in inputs if is_host(t)]
            if hosts and len(hosts) < len(inputs) and func not in _MIX_ALLOWED:
                wide = [t for t in hosts if t.dim() > 0]
                if wide:
                    device = next(t for t in inputs if not is_host(t))
                    raise DeviceDisciplineError(
                        f"{_name(func)} combines a {describe(device)} with a "
                        f"{describe(wide[0])}; on a GPU this raises 'Expected all tensors to "
                        f"be on the same device'. Create the host tensor with "
                        f"device=runtime.current_device() (or move it there).")
            host = bool(inputs) and len(hosts) == len(inputs)
        out = run(func, args, kwargs)
        if func in _MOVES:
            source = args[0]
            if out is source and is_host(source) != host:
                # On the CPU the move is a no-op returning its input; the moved tensor is a new
                # one on a GPU, so give it its own identity rather than retag the source.
                out = out.view_as(out)
        if host or any(is_host(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            _mark(out, host)
        return out

    def _requested(self, func, args, kwargs):
        """True/False when the call names where its result goes, else None."""
        device = kwargs.get("device")
        if func in _FACTORIES:
            return True if device is None else _placement(device, self._is_cuda)
        if func in _FOLLOW_INPUT:
            return None if device is None else _placement(device, self._is_cuda)
        if func is torch.Tensor.to:
            target = _to_target(args, kwargs)
            return None if target is None else _placement(target, self._is_cuda)
        if func is torch.Tensor.cuda:
            return False
        if func is torch.Tensor.cpu or func is torch.Tensor.pin_memory:
            return True
        return None


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
