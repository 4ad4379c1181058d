"""Fixes for genuine upstream bugs in megatron-core (not CPU support; that is runtime/cpu.py).

Each module states TARGET (affected versions), WHY (the bug), OBSOLETE_WHEN (how to tell it
can be deleted), and exposes is_needed() -- a probe of the installed megatron-core, not a
version check -- plus idempotent apply() and is_applied(). apply_all() applies only the
patches whose probe finds the bug, so an upgraded megatron-core silently skips fixed ones.
"""

from __future__ import annotations

from . import moe_router_gemm, pp2_batched_p2p_order

ALL = [moe_router_gemm, pp2_batched_p2p_order]


def _name(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def apply_all() -> list[str]:
    """Apply every needed patch (idempotent); return the names of the patches in effect."""
    for patch in ALL:
        patch.apply()
    return [_name(patch) for patch in ALL if patch.is_applied()]
