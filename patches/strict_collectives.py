"""Strict device mode (``SPANNORM_STRICT_DEVICES=1``, CPU runtime only): collectives as on GPUs.

Installs the bookkeeping of :mod:`spannorm_megatron.runtime.strict_devices` into the CPU
runtime's torch-function mode, and wraps every tensor collective of ``torch.distributed`` so
that a host tensor given to a group that would be NCCL on GPUs raises. Groups created with
``backend="gloo"`` (megatron-core's CPU-side groups) take host tensors, as on a GPU cluster,
so ``new_group`` is wrapped to record them. A check, not a way to train: it costs a few
microseconds per torch call.
"""

from __future__ import annotations

import functools
import inspect

import torch.distributed as dist
from torch.distributed import distributed_c10d

from spannorm_megatron.runtime.device import has_accelerator
from spannorm_megatron.runtime.strict_devices import (
    DeviceDisciplineError,
    StrictDevices,
    describe,
    is_host,
    strict_devices_requested,
    tensor_inputs,
)

from .contract import Patch
from .cpu_device_arguments import MODE, is_cuda_device

_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "send", "recv",
    "isend", "irecv", "all_to_all", "all_to_all_single", "batch_isend_irecv",
    "_all_gather_base", "_reduce_scatter_base",
)
_HOST_GROUPS: "set[int]" = set()  # ids of groups created with backend="gloo"


def _check_collective(name, signature, args, kwargs) -> None:
    if name == "batch_isend_irecv":
        ops = args[0] if args else kwargs.get("p2p_op_list", [])
        items = [(op.tensor, op.group) for op in ops]
    else:
        group = signature.bind_partial(*args, **kwargs).arguments.get("group")
        items = [(t, group) for t in tensor_inputs(args, kwargs)]
    for tensor, group in items:
        if is_host(tensor) and not (group is not None and id(group) in _HOST_GROUPS):
            raise DeviceDisciplineError(
                f"torch.distributed.{name} got a {describe(tensor)}; on GPUs this group is "
                f"NCCL, which takes CUDA tensors only. Create it with "
                f"device=runtime.current_device().")


def _checked(name, original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def checked(*args, **kwargs):
        _check_collective(name, signature, args, kwargs)
        return original(*args, **kwargs)

    return checked


def _swaps():
    swaps = [(MODE, "strict", StrictDevices(is_cuda=is_cuda_device))]
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        checked = _checked(name, original)
        swaps.append((dist, name, checked))
        if name in ("isend", "irecv"):
            # `P2POp` accepts only the functions c10d itself names isend/irecv.
            swaps.append((distributed_c10d, name, checked))
    new_group = dist.new_group

    @functools.wraps(new_group)
    def new_group_recording_gloo(*args, **kwargs):
        group = new_group(*args, **kwargs)
        backend = kwargs.get("backend", args[2] if len(args) > 2 else None)
        if group is not None and str(backend).lower() == "gloo":
            _HOST_GROUPS.add(id(group))
        return group

    return swaps + [(dist, "new_group", new_group_recording_gloo)]


PATCH = Patch(
    "strict_collectives",
    target=("torch.distributed's tensor collectives and new_group; the CPU runtime's mode "
            "(patch cpu_device_arguments)"),
    why=__doc__,
    obsolete_when="never: a test aid, applied only when SPANNORM_STRICT_DEVICES is set.",
    probe=lambda original: strict_devices_requested() and not has_accelerator(),
    swaps=_swaps,
)
