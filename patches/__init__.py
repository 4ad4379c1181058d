"""Every alteration this project makes to upstream code (megatron-core, torch), in one registry.

Each module holds one :class:`~.contract.Patch` (``PATCH``): target, why (the module's
docstring), how to tell it is obsolete, an ``is_needed()`` probe of the installed code, and
``apply()`` / ``revert()``.
Importing this package alters nothing. The patches come in three sets:

- ``UPSTREAM``: fixes for genuine megatron-core bugs, on any device;
  ``spannorm_megatron.process.apply_patches()`` applies them.
- ``CPU_RUNTIME``: what lets the CPU stand in for the CUDA device megatron-core assumes;
  ``spannorm_megatron.process.enable_cpu_runtime()`` applies them when there is no GPU. Deliberately not handled
  (not on the training path): pinned memory and activation/optimizer offloading, CUDA graphs,
  NVTX ranges, ``Event.elapsed_time`` timers, Transformer Engine.
- ``STRICT_DEVICES``: strict device mode's checks, applied with the CPU runtime when
  ``SPANNORM_STRICT_DEVICES`` is set.

A patch whose probe finds upstream without the defect is skipped, so an upgraded megatron-core
silently drops the patches it no longer needs.
"""

from __future__ import annotations

from . import (
    checkpoint_results_queue,
    cpu_autograd_engine,
    cpu_device_arguments,
    cpu_eager_expert_bias,
    cpu_moe_split_sizes,
    cpu_rng,
    cpu_torch_cuda,
    cpu_uneven_collectives,
    distopt_step_load,
    expert_bias_inplace,
    moe_router_gemm,
    pp2_batched_p2p_order,
    strict_collectives,
    strict_legacy_constructors,
    strict_threads,
)
from .contract import ABSENT, Patch

UPSTREAM = [moe_router_gemm.PATCH, pp2_batched_p2p_order.PATCH, distopt_step_load.PATCH,
            checkpoint_results_queue.PATCH, expert_bias_inplace.PATCH]
CPU_RUNTIME = [
    cpu_torch_cuda.PATCH,
    cpu_rng.PATCH,
    cpu_moe_split_sizes.PATCH,
    cpu_uneven_collectives.PATCH,
    cpu_autograd_engine.PATCH,
    cpu_eager_expert_bias.PATCH,
    cpu_device_arguments.PATCH,
]
STRICT_DEVICES = [strict_collectives.PATCH, strict_legacy_constructors.PATCH,
                  strict_threads.PATCH]
ALL = UPSTREAM + CPU_RUNTIME + STRICT_DEVICES

__all__ = ["ABSENT", "ALL", "CPU_RUNTIME", "Patch", "STRICT_DEVICES", "UPSTREAM",
           "apply_all", "revert_all"]


def apply_all(patches=UPSTREAM) -> list[str]:
    """Apply every needed patch of ``patches`` (idempotent); the names of those in effect."""
    for patch in patches:
        patch.apply()
    return [patch.name for patch in patches if patch.is_applied()]


def revert_all(patches=ALL) -> list[str]:
    """Revert ``patches`` in reverse order; the names of those that were in effect."""
    return [patch.name for patch in reversed(patches) if patch.revert()][::-1]
