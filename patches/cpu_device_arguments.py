"""CPU runtime: CUDA device arguments and CUDA tensor type names resolve to the CPU.

Without a GPU every CUDA allocation raises, and megatron-core 0.16.1 allocates with
``device="cuda"``, ``device=torch.cuda.current_device()`` or ``device=<int>`` in tensor
factories, ``Tensor.to(<cuda>)`` and ``Tensor.cuda()`` (attention and RoPE buffers, DDP
``param_and_grad_buffer``, ``GlobalMemoryBuffer``, all-to-all/gather outputs in
``tensor_parallel.mappings``, p2p receive buffers, ``schedules.py`` token counts,
``clip_grads``, ``optimizer.py`` found-inf / scale tensors, ``local_multi_tensor_l2_norm``,
``rerun_state_machine``, MoE router buffers and metrics), and checks legacy type names
(``t.type() == 'torch.cuda.FloatTensor'`` in ``clip_grads``,
``DistributedOptimizer._build_model_and_main_param_groups``,
``Float16OptimizerWithFloat16Params``). Some are literals, so there is no function to redirect:
a :class:`torch.overrides.TorchFunctionMode` maps them to the CPU ("meta" and other devices pass
through) and reports CPU tensors under the CUDA type name. It is per thread: call
``enable_cpu_runtime()`` in every thread that runs megatron code. Its handler is a kwarg check
and a dict lookup; the mode machinery costs ~2 us per torch call (2.8 vs 1.05 us for a tiny add;
~2,100 calls in a training step of a 2-layer model), on CPU runs only.
"""

from __future__ import annotations

import inspect

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from spannorm_megatron.runtime.device import has_accelerator

from .contract import Patch


def is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int means "CUDA ordinal" to torch (bool is an int; never a device).
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cuda_type_name(name: str) -> str:
    # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor'
    return "torch.cuda." + name[len("torch.") :] if name.startswith("torch.") else name


def _cpu_type_name(name):
    if isinstance(name, str) and name.startswith("torch.cuda."):
        return "torch." + name[len("torch.cuda.") :]
    return name


class CpuAsDeviceMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and CPU tensor type names to CUDA ones.

    Kept to a dict lookup on the common path: every torch call in the process passes here.
    In strict device mode (patch ``strict_collectives``) ``strict`` also records, on every
    call, where a GPU run would hold the result.
    """

    strict = None  # a runtime.strict_devices.StrictDevices in strict device mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.strict is not None:
            return self.strict.call(func, args, kwargs or {}, self._call)
        return self._call(func, args, kwargs)

    @staticmethod
    def _call(func, args, kwargs):
        if kwargs is None:
            kwargs = {}
        elif is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(func, args, kwargs)
        return func(*args, **kwargs)


def _tensor_to(func, args, kwargs):
    # Tensor.to(device[, dtype, ...]) with a positional device.
    if len(args) > 1 and is_cuda_device(args[1]):
        args = (args[0], "cpu") + tuple(args[2:])
    return func(*args, **kwargs)


def _tensor_cuda(func, args, kwargs):
    # Tensor.cuda() on the stand-in device is "already there": return the tensor, as CUDA does.
    return args[0]


def _tensor_type(func, args, kwargs):
    if len(args) == 1 and not kwargs:
        return _cuda_type_name(func(*args))
    if len(args) > 1:
        args = (args[0], _cpu_type_name(args[1])) + tuple(args[2:])
    if "dtype" in kwargs:
        kwargs = {**kwargs, "dtype": _cpu_type_name(kwargs["dtype"])}
    return func(*args, **kwargs)


_SPECIAL = {
    torch.Tensor.to: _tensor_to,
    torch.Tensor.cuda: _tensor_cuda,
    torch.Tensor.type: _tensor_type,
}

MODE = CpuAsDeviceMode()


def mode_active() -> bool:
    return any(m is MODE for m in _get_current_function_mode_stack())


def _allocates_on_cuda() -> bool:
    from megatron.core.pipeline_parallel import schedules

    return 'device="cuda"' in inspect.getsource(schedules)


class _ThreadModePatch(Patch):
    """Torch-function modes are per thread: applied means on this thread's mode stack."""

    def is_applied(self) -> bool:
        return mode_active()

    def apply(self) -> bool:
        if self.is_applied() or not self.is_needed():
            return False
        MODE.__enter__()  # exited only by revert(): the mode lives as long as the thread
        return True

    def revert(self) -> bool:
        if not self.is_applied():
            return False
        if _get_current_function_mode_stack()[-1] is not MODE:
            raise RuntimeError(f"patch {self.name}: another torch-function mode was pushed "
                               f"over the CPU runtime's; exit it first.")
        MODE.__exit__(None, None, None)
        return True


PATCH = _ThreadModePatch(
    "cpu_device_arguments",
    target=("megatron-core 0.16.1 (any torch): CUDA device arguments and legacy CUDA type "
            "names in tensor factories, Tensor.to/.cuda/.type; the calling thread's "
            "torch-function mode stack"),
    why=__doc__,
    obsolete_when=("never while megatron-core assumes a CUDA device: drop it when it takes its "
                   "device from the caller (no device='cuda' literal left in "
                   "pipeline_parallel/schedules.py)."),
    probe=lambda original: not has_accelerator() and _allocates_on_cuda(),
    swaps=lambda: [],
)
