"""CPU runtime for megatron-core: every CUDA-only assumption handled in one place.

megatron-core 0.16.1 is written for CUDA devices: it allocates with ``device="cuda"`` or
``device=torch.cuda.current_device()``, keeps RNG state in the CUDA generator, overlaps
copies on CUDA streams and checks legacy CUDA tensor type names. On a machine without a GPU
(CI, laptops, the 2-core development boxes) we still want to run the *unchanged* model,
schedules, DDP and optimizers over gloo. :func:`enable_cpu_runtime` makes that possible by
letting the CPU stand in for "the" device. It does nothing when a CUDA device is present, so
the GPU path is never touched; importing this module changes nothing either.

Touch points and how each is handled (narrowest fix that covers it):

1. ``device="cuda"`` / ``device=torch.cuda.current_device()`` / ``device=<int>`` in tensor
   factories, ``Tensor.to(<cuda>)`` and ``Tensor.cuda()`` (attention and RoPE buffers, DDP
   ``param_and_grad_buffer``, ``GlobalMemoryBuffer``, all-to-all/gather outputs in
   ``tensor_parallel.mappings``, p2p receive buffers, ``schedules.py`` token counts,
   ``clip_grads``, ``optimizer.py`` found-inf / scale tensors, ``local_multi_tensor_l2_norm``,
   ``rerun_state_machine``, MoE router buffers and metrics). Some are literals, so there is
   no function to redirect: a :class:`torch.overrides.TorchFunctionMode` rewrites CUDA device
   arguments to CPU ("meta" and other devices pass through). It is pushed for the calling
   thread and re-pushed around the autograd engine (7). Its handler is a kwarg check and a
   dict lookup; the mode machinery costs ~2 us per torch call (2.8 vs 1.05 us for a tiny
   add; ~2,100 calls in a training step of a 2-layer model), on CPU runs only.
2. Legacy type-name checks ``t.type() == 'torch.cuda.FloatTensor'`` (``clip_grads``
   assertion, ``DistributedOptimizer._build_model_and_main_param_groups``,
   ``Float16OptimizerWithFloat16Params``): the same mode reports CPU tensors under the CUDA
   name and maps CUDA names given to ``t.type(name)`` back to CPU ones.
3. ``torch.cuda.current_device()`` (called unconditionally almost everywhere): returns 0, a
   valid CUDA ordinal that the mode (1) then maps to CPU. An int keeps code such as
   ``torch.device("cuda", torch.cuda.current_device())`` working.
4. RNG: ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker`` call
   ``torch.cuda.manual_seed/get_rng_state/set_rng_state`` and megatron's
   ``_set_cuda_rng_state``. Without CUDA those are silently *queued*
   (``torch.cuda._lazy_call``) or raise, so the tracker would never switch states. They are
   redirected to the CPU default generator, which is the generator CPU dropout/init use, so
   TP ranks share the default stream and differ in the model-parallel stream exactly as on
   GPU. The tracker's "CPU RNG state changed within GPU RNG context" warning is filtered:
   with the CPU as device the two generators are the same one by design.
5. Streams and events (MoE all-to-all dispatcher's device-to-host stream, p2p and DDP
   ``torch.cuda.synchronize``): CPU work is synchronous, so ``torch.cuda.Stream/Event/
   current_stream/default_stream/stream/synchronize`` become the device-agnostic
   ``torch.cpu`` ones, with an event returned from ``Stream.record_event`` (torch.cpu's
   returns None, which the dispatcher then calls ``.synchronize()`` on).
6. MoE all-to-all split sizes: ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` converts only
   CUDA tensors, so on CPU the splits stay tensors and ``all_to_all_single`` rejects them.
   The token dispatcher's reference is wrapped to return numpy arrays, as on GPU.
7. Autograd: the mode is thread-local and torch pops a mode while its handler runs, so a
   ``loss.backward()`` dispatched through it would run custom ``Function.backward`` and DDP
   grad hooks (which allocate with CUDA device arguments) without it.
   ``torch.autograd._engine_run_backward`` is wrapped to push the mode for the engine run.

8. Uneven collectives (expert tensor parallelism): gloo's ``all_gather`` needs equal sizes and
   it has no list ``reduce_scatter``, so the two ``tensor_parallel.mappings`` helpers fall
   back to pad-gather-trim and all-reduce-then-slice when split sizes are given.

Everything here is applied once per process (the mode once per thread that calls
:func:`enable_cpu_runtime`) and never when :func:`~.device.has_accelerator` is true.
``torch.cuda.is_available()`` keeps answering False: megatron code that asks takes its own
CPU branch. Deliberately not handled (not on the training path above): pinned memory and
activation/optimizer offloading, CUDA graphs, NVTX ranges, ``Event.elapsed_time`` timers,
Transformer Engine.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from .device import has_accelerator
from .strict_devices import StrictDevices, patch_collectives, strict_devices_requested

__all__ = ["enable_cpu_runtime", "is_cpu_runtime_enabled", "should_enable_cpu_runtime"]

_LOCK = threading.Lock()
_PATCHED = False


# --- 1 + 2: device arguments and legacy type names --------------------------------------------


def _is_cuda_device(dev) -> bool:
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


class _CpuAsDeviceMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU and CPU tensor type names to CUDA ones.

    Kept to a dict lookup on the common path: every torch call in the process passes here.
    In strict device mode (``strict_devices.py``) each call also records where a GPU run would
    hold its result.
    """

    strict = None  # a StrictDevices when SPANNORM_STRICT_DEVICES is set

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.strict is not None:
            return self.strict.call(func, args, kwargs or {}, self._call)
        return self._call(func, args, kwargs)

    @staticmethod
    def _call(func, args, kwargs):
        if kwargs is None:
            kwargs = {}
        elif _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(func, args, kwargs)
        return func(*args, **kwargs)


def _tensor_to(func, args, kwargs):
    # Tensor.to(device[, dtype, ...]) with a positional device.
    if len(args) > 1 and _is_cuda_device(args[1]):
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

_MODE = _CpuAsDeviceMode()


def _mode_active() -> bool:
    return any(m is _MODE for m in _get_current_function_mode_stack())


def _push_mode_in_this_thread() -> None:
    if not _mode_active():
        # Entered and deliberately never exited: the mode lives as long as the thread.
        _MODE.__enter__()


# --- 7: keep the mode inside the autograd engine -----------------------------------------------


def _patch_autograd_engine() -> None:
    import torch.autograd as autograd

    original = autograd._engine_run_backward

    def _engine_run_backward_with_mode(*args, **kwargs):
        if _mode_active():
            return original(*args, **kwargs)
        with _MODE:
            return original(*args, **kwargs)

    autograd._engine_run_backward = _engine_run_backward_with_mode


# --- 3 + 5: torch.cuda entry points megatron calls unconditionally ----------------------------


class _HostStream(torch.cpu.Stream):
    """A CUDA-stream stand-in: CPU ops are synchronous, so ordering is already guaranteed."""

    def __init__(self, *args, **kwargs):  # accepts device=/priority= like torch.cuda.Stream
        super().__init__()

    def record_event(self, event=None):
        event = event if event is not None else _HostEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostEvent(torch.cpu.Event):
    """A CUDA-event stand-in; accepts ``enable_timing=`` etc. like ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass


_HOST_STREAM = _HostStream()


def _current_device() -> int:
    """Ordinal 0: a valid CUDA index that the mode maps to CPU wherever it is used."""
    return 0


def _current_stream(device=None) -> _HostStream:
    return _HOST_STREAM


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = _current_device
    cuda.Stream = _HostStream
    cuda.Event = _HostEvent
    cuda.current_stream = _current_stream
    cuda.default_stream = _current_stream
    cuda.stream = torch.cpu.stream
    cuda.synchronize = torch.cpu.synchronize

    # 4: the "device" generator is the CPU default generator.
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        # Not torch.manual_seed: that calls torch.cuda.manual_seed_all and would recurse if
        # someone redirected that too; the default generator is all there is on CPU.
        torch.default_generator.manual_seed(int(seed))

    for namespace in (cuda, cuda.random):
        namespace.get_rng_state = get_rng_state
        namespace.set_rng_state = set_rng_state
        namespace.manual_seed = manual_seed


# --- 4 + 6: megatron-core module references --------------------------------------------------


class _SameGeneratorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    # 4: megatron's setter goes through torch.cuda._lazy_call, which without CUDA queues the
    # call (with a captured stack) forever instead of running it, so the tracker would never
    # switch generators. Its getter already reads torch.cuda.random.get_rng_state (redirected).
    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._set_cuda_rng_state = _set_cuda_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_SameGeneratorFilter())

    # 6: all-to-all split sizes must be host sequences, as they are after a CUDA->CPU copy.
    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        tensor = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(tensor):
            tensor = tensor.detach().numpy().copy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    _patch_uneven_collectives()


# --- 8: uneven gathers and reduce-scatters on gloo ---------------------------------------------


def _patch_uneven_collectives() -> None:
    """Expert tensor parallelism gathers and reduce-scatters token blocks of different sizes per
    rank (`output_split_sizes` / `input_split_sizes`). NCCL takes uneven lists; gloo's
    all_gather requires equal sizes and it has no list reduce-scatter. Equal-split calls keep
    megatron's own code."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        # Pad every block to the largest, gather, and trim each back.
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(blocks, padded, group=group)
        return torch.cat([b[:n] for b, n in zip(blocks, output_split_sizes)])

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                       use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        # Reduce everything and keep this rank's block: more traffic, same result.
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


# --- public -----------------------------------------------------------------------------------


def should_enable_cpu_runtime(accelerator_present: bool | None = None) -> bool:
    """The decision alone: the CPU runtime is for processes without a CUDA device."""
    if accelerator_present is None:
        accelerator_present = has_accelerator()
    return not accelerator_present


def is_cpu_runtime_enabled() -> bool:
    """True once :func:`enable_cpu_runtime` has patched this process."""
    return _PATCHED


def enable_cpu_runtime() -> bool:
    """Let megatron-core run with the CPU as its device; no-op when a GPU is present.

    Idempotent. Process-wide redirects are installed once; the device mode is pushed in the
    calling thread (call again from any other thread that runs megatron code).
    Returns True when the CPU runtime is active.
    """
    global _PATCHED
    if not should_enable_cpu_runtime():
        return False
    with _LOCK:
        if not _PATCHED:
            _patch_torch_cuda()
            _patch_megatron()
            _patch_autograd_engine()
            if strict_devices_requested():
                _MODE.strict = StrictDevices(is_cuda=_is_cuda_device)
                patch_collectives()
            _PATCHED = True
    _push_mode_in_this_thread()
    return True
