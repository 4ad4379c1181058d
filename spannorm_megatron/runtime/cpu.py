"""CPU runtime for megatron-core: the CPU plays the CUDA device megatron-core 0.16.1 assumes.

megatron-core allocates with ``device="cuda"``, keeps RNG state in the CUDA generator, overlaps
copies on CUDA streams and checks legacy CUDA tensor type names. On a machine without a GPU (CI,
laptops, the 2-core development boxes) we still run the *unchanged* model, schedules, DDP and
optimizers over gloo. Every alteration that takes is a patch of the ``CPU_RUNTIME`` set in the
top-level ``patches/`` folder (the ``cpu_*`` modules, each listing the touch points it handles),
under the same contract as the upstream fixes, and can be reverted. :func:`enable_cpu_runtime`
applies that set, plus strict device mode's checks when ``SPANNORM_STRICT_DEVICES`` is set; it
does nothing when a CUDA device is present, so the GPU path is never touched. Importing this
module changes nothing either.
"""

from __future__ import annotations

import threading

from .device import has_accelerator

__all__ = ["enable_cpu_runtime", "is_cpu_runtime_enabled", "should_enable_cpu_runtime"]

_LOCK = threading.Lock()


def _patches():
    from .distributed import load_patches  # distributed imports this module

    return load_patches()


def should_enable_cpu_runtime(accelerator_present: bool | None = None) -> bool:
    """The decision alone: the CPU runtime is for processes without a CUDA device."""
    if accelerator_present is None:
        accelerator_present = has_accelerator()
    return not accelerator_present


def is_cpu_runtime_enabled() -> bool:
    """True while patches of the CPU runtime are applied (process-wide ones from any thread)."""
    return any(p.is_applied() for p in _patches().CPU_RUNTIME)


def enable_cpu_runtime() -> bool:
    """Let megatron-core run with the CPU as its device; no-op when a GPU is present.

    Idempotent. Process-wide patches are applied once; the device-argument mode is pushed in
    the calling thread (call again from any other thread that runs megatron code).
    Returns True when the CPU runtime is active.
    """
    if not should_enable_cpu_runtime():
        return False
    patches = _patches()
    with _LOCK:
        patches.apply_all(patches.CPU_RUNTIME + patches.STRICT_DEVICES)
    return True
