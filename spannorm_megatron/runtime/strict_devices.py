"""Strict device mode: on a CPU machine, fail where a GPU run would put a tensor on the wrong device.

On a GPU every rank computes on ``cuda:N`` while a tensor made without ``device=`` lands in host
memory; NCCL refuses host tensors and an op that meets a CUDA tensor with a host tensor (other
than a 0-dim scalar input) raises. On a CPU machine both are the same device, so the CPU suite
cannot see that class of defect, and the GPU machine we can test on has one GPU, so its
collectives never run there either. This mode restores the distinction on CPU:

- :func:`~.device.current_device` answers ``cuda:0``, what a GPU rank would use; the CPU
  runtime's mode maps it to the CPU as it does megatron-core's own CUDA arguments.
- Every tensor remembers where a GPU run would have put it, and a device tensor's ``.device``
  answers ``cuda:0``: a factory without ``device=`` (``torch.tensor``, ``zeros``, ``asarray``,
  ``from_numpy``..., and the legacy ``torch.Tensor(...)``/``torch.FloatTensor(...)`` that patch
  ``strict_legacy_constructors`` reports), ``.cpu()`` or ``.to("cpu")`` make a *host* tensor; a
  CUDA device argument, ``.cuda()`` or ``.to(current_device())`` a *device* tensor;
  ``torch.tensor(t)``, ``as_tensor``/``asarray`` of a tensor, ``*_like`` and ``t.new_*`` follow
  their tensor; an op that writes into a tensor (``add_``, ``copy_``, ``index_put_``,
  ``t[i] = v``, ``out=``) leaves it where it is, ``t.data = x`` puts t where x is; every other
  op's result is host only when all its tensor inputs are (``set_``, which torch does not show
  to the mode, is not followed). Parameters and tensors of unknown origin count as device
  tensors, so the mode never invents a defect.
- An op that mixes the two raises :class:`DeviceDisciplineError` where CUDA would
  (:meth:`StrictDevices.check_mix` has the rules and where they come from).
- A host tensor given to a collective on a group that would be NCCL on GPUs raises too. Groups
  created with ``backend="gloo"`` (megatron-core's CPU-side groups) take host tensors, as they
  do on a GPU cluster. That check wraps torch.distributed, so it is a patch:
  ``patches/strict_collectives.py``, which also installs :class:`StrictDevices` into the CPU
  runtime's mode; ``patches/strict_threads.py`` puts that mode on every thread started while
  the mode is on (a torch-function mode is per thread).

``SPANNORM_STRICT_DEVICES=1`` turns it on for a process (read when the CPU runtime is enabled,
i.e. at :func:`~.distributed.initialize`); the test suite runs the training loop under it. It is
a check, not a way to train: it costs a few microseconds per torch call.
"""

from __future__ import annotations

import os
from typing import Callable, List

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


def mark(outputs, host: bool) -> None:
    """Record where a GPU run would hold every tensor of `outputs` (Parameters excepted)."""
    for out in tree_flatten(outputs)[0]:
        if isinstance(out, torch.Tensor) and not isinstance(out, torch.nn.Parameter):
            try:
                setattr(out, _HOST, host)
            except (AttributeError, RuntimeError):  # e.g. tensors of C++-only subclasses
                pass


# Factories place their result on `device=`, or in host memory when it is absent.
_FACTORIES = {
    torch.scalar_tensor, torch.from_numpy, torch.frombuffer,
    torch.zeros, torch.ones, torch.empty, torch.empty_strided, torch.full, torch.eye,
    torch.arange, torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint,
    torch.randperm, torch.normal,
}
# ... these too, except that given a tensor as data they keep it where it is (`torch.tensor(t)`
# copies it on its device; `as_tensor`/`asarray` return it or a view).
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
# `*_like` and `new_*` follow their input unless `device=` says otherwise.
_FOLLOW_INPUT = {
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like, torch.Tensor.new_zeros, torch.Tensor.new_ones,
    torch.Tensor.new_empty, torch.Tensor.new_full, torch.Tensor.new_tensor,
    torch.Tensor.new_empty_strided, torch.Tensor.new,
}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
# Ops that CUDA allows across devices: copies and moves, and `fill_`, which reads its 0-dim
# value with `.item()` when it is elsewhere (ATen `fill_(Tensor)`: "if (self.device() !=
# value.device()) return fill_out(self, value.item())").
_CROSS_DEVICE = {torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda,
                 torch.Tensor.pin_memory, torch.Tensor.fill_}
# Writes through indices: the indices may be host tensors, and a 0-dim value may be anywhere
# (ATen `_index_put_impl_`: "if (value.device() != self.device() && value.numel() == 1 &&
# value.dim() == 0) value_ = value.to(self.device())"); a wider value must be where the written
# tensor is, unless `t[1:3] = v` slices without tensors, which is a copy.
_INDEX_WRITES = {torch.Tensor.index_put_, torch.Tensor.index_put, torch.Tensor.__setitem__}
_INDEXING = {torch.Tensor.__getitem__}
# Ops that take no host operand next to a device one, not even a 0-dim scalar. CUDA admits host
# scalars in TensorIterator ops built with `allow_cpu_scalars` (binary and comparison ops, and
# in recent releases lerp/addcmul/addcdiv) and in `where`; an op missing here is given the
# benefit of that doubt. These are not TensorIterator ops: `cat` (and `stack`, which cats its
# unsqueezed inputs) checks one device for all inputs, `equal` raises "Cannot compare two
# tensors on different devices", and `embedding`/`index_select` want the indices on the
# weight's device ("Input, output and indices must be on the current device").
_NO_HOST_SCALARS = {
    torch.stack, torch.hstack, torch.vstack, torch.dstack, torch.column_stack, torch.cat,
    torch.concat, torch.concatenate, torch.equal, torch.Tensor.equal, torch.embedding,
    torch.nn.functional.embedding, torch.index_select, torch.Tensor.index_select,
}
# In-place operators as the mode sees them (`a += b` arrives as `add_`, `a |= b` as `__ior__`).
_IN_PLACE_OPERATORS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                       "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                       "__ilshift__", "__irshift__", "__setitem__"}
_DEVICE_DESCRIPTOR = torch._C.TensorBase.__dict__["device"]  # `t.device` calls its __get__
_DATA_DESCRIPTOR = torch._C.TensorBase.__dict__["data"]  # `t.data = x` calls its __set__
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


def written(func, args, kwargs) -> List[torch.Tensor]:
    """The tensors an op writes into: ``out=``, or the first argument of an in-place op
    (``add_``, ``_foreach_mul_``, ``__ior__``, ``__setitem__``). On a GPU these stay where they
    are, whatever the op reads."""
    out = kwargs.get("out")
    if out is not None:
        return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    name = getattr(func, "__name__", "")
    in_place = (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_OPERATORS
    if not in_place or not args:
        return []
    return [t for t in tree_flatten(args[0])[0] if isinstance(t, torch.Tensor)]


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
        if getattr(func, "__self__", None) is _DATA_DESCRIPTOR and func.__name__ == "__set__":
            out = run(func, args, kwargs)
            mark(args[0], is_host(args[1]))  # `t.data = new`: t now holds new's memory
            return out
        if func is torch.Tensor.type and any(isinstance(a, HostConstructor) for a in args):
            args = tuple(a.legacy if isinstance(a, HostConstructor) else a for a in args)
        host = self._requested(func, args, kwargs)
        targets = written(func, args, kwargs)
        if host is None:
            inputs = tensor_inputs(args, kwargs)
            self.check_mix(func, args, kwargs, inputs, targets)
            host = bool(inputs) and all(is_host(t) for t in inputs)
        out = run(func, args, kwargs)
        if targets:
            # Written in place (or into `out=`): the result is that tensor, still where it was.
            return out
        if func in _INDEXING:
            host = is_host(args[0])  # indexing with host indices keeps the indexed tensor's place
        if func in _MOVES:
            source = args[0]
            if out is source and is_host(source) != host:
                # On the CPU the move is a no-op returning its input; the moved tensor is a new
                # one on a GPU, so give it its own identity rather than retag the source.
                out = out.view_as(out)
        if host or any(is_host(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            mark(out, host)
        return out

    @staticmethod
    def check_mix(func, args, kwargs, inputs, targets) -> None:
        """Raise where CUDA refuses to meet device and host tensors in one op.

        ATen's rule (aten/src/ATen/TensorIterator.cpp, ``compute_types``): the op runs on the
        first non-CPU device among its operands, outputs included, and a CPU operand passes
        only if ``config.allow_cpu_scalars_ && !op.is_output && op.tensor_base().dim() == 0``
        (binary and comparison ops; ``where`` moves 0-dim CPU inputs itself), else "Expected
        all tensors to be on the same device". A CPU output never passes. So
        ``device_t + host_scalar`` runs while ``host_scalar += device_t`` raises, and so does
        any op writing into a host tensor that reads a device tensor. Ops outside
        TensorIterator that are known to refuse even a scalar are in ``_NO_HOST_SCALARS``; any
        other op gets a 0-dim host input through (no false alarm). Copies and moves cross
        devices; indexing takes host indices; ``fill_``/``index_put_``/``t[i] = v`` take a
        0-dim value from anywhere.
        """
        hosts = [t for t in inputs if is_host(t)]
        if not hosts or len(hosts) == len(inputs) or func in _CROSS_DEVICE:
            return
        device = next(t for t in inputs if not is_host(t))
        if func in _INDEXING:
            # ATen's `index` checks "indices should be either on cpu or on the same device as
            # the indexed tensor": a host tensor indexed with device indices raises.
            if is_host(args[0]):
                _refuse(func, device, args[0])
            return
        if func in _INDEX_WRITES:
            target = args[0]
            value = args[2] if len(args) > 2 else kwargs.get("values", kwargs.get("value"))
            if isinstance(value, torch.Tensor) and value.dim() > 0 \
                    and is_host(value) != is_host(target) and _through_indices(func, args):
                _refuse(func, value if is_host(value) else device, target)
            return
        for target in targets:
            if is_host(target):
                # A host output next to a device operand: CUDA picks the device and refuses the
                # output ("Expected all tensors to be on the same device").
                _refuse(func, device, target)
        written_ids = {id(t) for t in targets}
        for tensor in hosts:
            if id(tensor) in written_ids:
                continue
            if tensor.dim() > 0 or func in _NO_HOST_SCALARS:
                _refuse(func, device, tensor)

    def _requested(self, func, args, kwargs):
        """True/False when the call names where its result goes, else None."""
        device = kwargs.get("device")
        if func in _FACTORIES:
            if device is None and func is torch.normal and tensor_inputs(args, kwargs):
                return None  # `normal(mean, std)` with tensor moments samples where they are
            return True if device is None else _placement(device, self._is_cuda)
        if func in _FROM_DATA:
            if device is not None:
                return _placement(device, self._is_cuda)
            data = args[0] if args else kwargs.get("data", kwargs.get("obj"))
            return is_host(data) if isinstance(data, torch.Tensor) else True
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


def record_legacy(tensor: torch.Tensor, args) -> torch.Tensor:
    """Record what a legacy constructor made of `args`: an alias of a tensor argument stays
    where that tensor is; anything else is new host memory."""
    mark(tensor, not (args and isinstance(args[0], torch.Tensor)) or is_host(args[0]))
    return tensor


class HostConstructor:
    """A legacy tensor constructor (``torch.Tensor``'s ``__new__``, ``torch.FloatTensor``...)
    whose result is recorded as a host tensor, as a GPU run allocates it; given a tensor, the
    result aliases it and stays where it is. These constructors make their tensor in C without
    meeting torch-function modes, so ``patches/strict_legacy_constructors.py`` puts these in
    their place. Otherwise it stands for the type: ``isinstance(x, torch.FloatTensor)``, its
    name and attributes, ``t.type(torch.FloatTensor)`` (unwrapped by :class:`StrictDevices`).
    """

    def __init__(self, legacy):
        self.legacy = legacy
        for name in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(self, name, getattr(legacy, name, None))

    def __call__(self, *args, **kwargs):
        return record_legacy(self.legacy(*args, **kwargs), args)

    def __instancecheck__(self, obj) -> bool:
        return isinstance(obj, self.legacy)

    def __getattr__(self, name):
        return getattr(self.legacy, name)

    def __repr__(self) -> str:
        return repr(self.legacy)


def _through_indices(func, args) -> bool:
    """Whether a write goes through index_put_: always for index_put_, for `t[key] = v` when a
    tensor is among the key's parts (basic slicing is a copy, which crosses devices)."""
    if func is not torch.Tensor.__setitem__:
        return True
    return len(args) > 1 and any(isinstance(t, torch.Tensor) for t in tree_flatten(args[1])[0])


def _refuse(func, device: torch.Tensor, host: torch.Tensor) -> None:
    raise DeviceDisciplineError(
        f"{_name(func)} meets a {describe(device)} with a {describe(host)}; on a GPU this "
        f"raises 'Expected all tensors to be on the same device'. Create the host tensor with "
        f"device=runtime.current_device() (or move it there).")


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
