"""Runtime layer: device choice, process groups, and the CPU stand-in for megatron-core.

The model code is written once against megatron-core. What differs between a GPU cluster and
a CPU-only machine (NCCL vs gloo, CUDA-only calls inside megatron-core) is decided here at
run time: the device, the backend, the process groups. What megatron-core needs altered to run
on a CPU lives in the top-level ``patches/`` folder, which depends on this package and is never
imported by it: ``spannorm_megatron.process`` applies the patch sets for an entry point.
"""

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
    gather_updated_parameters,
    initialize,
    megatron_device_kwargs,
    set_seed,
    validate_layout,
)
from .launch import LaunchEnvironment, launch_environment

__all__ = [
    "LaunchEnvironment",
    "ParallelLayout",
    "ParallelLayoutError",
    "base_seed",
    "backend",
    "check_launch",
    "current_device",
    "destroy",
    "gather_updated_parameters",
    "device_type",
    "has_accelerator",
    "initialize",
    "launch_environment",
    "megatron_device_kwargs",
    "ranks_per_node",
    "set_seed",
    "validate_layout",
]
