"""Runtime layer: device choice, process groups, and the CPU stand-in for megatron-core.

The model code is written once against megatron-core. What differs between a GPU cluster and
a CPU-only machine (NCCL vs gloo, CUDA-only calls inside megatron-core) is decided here at
run time: on a GPU nothing in megatron-core is altered; without one, :func:`enable_cpu_runtime`
(called by :func:`initialize`) lets the CPU play the device. Importing this package patches
nothing.
"""

from .cpu import enable_cpu_runtime, is_cpu_runtime_enabled, should_enable_cpu_runtime
from .device import (
    backend,
    check_launch,
    current_device,
    device_type,
    has_accelerator,
    ranks_per_node,
)
from .distributed import (
    ParallelLayout,
    ParallelLayoutError,
    base_seed,
    destroy,
    initialize,
    load_patches,
    megatron_device_kwargs,
    set_seed,
    validate_layout,
)

__all__ = [
    "ParallelLayout",
    "ParallelLayoutError",
    "base_seed",
    "backend",
    "check_launch",
    "current_device",
    "destroy",
    "device_type",
    "enable_cpu_runtime",
    "has_accelerator",
    "initialize",
    "is_cpu_runtime_enabled",
    "load_patches",
    "megatron_device_kwargs",
    "ranks_per_node",
    "set_seed",
    "should_enable_cpu_runtime",
    "validate_layout",
]
