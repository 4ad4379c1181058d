"""MoE router gating without Transformer Engine: ``NameError: te_general_gemm``.

Not a CPU issue: it hits any install without Transformer Engine (CPU or GPU), on every MoE
forward, whatever ``moe_router_dtype`` is.
"""

from __future__ import annotations

TARGET = "megatron-core 0.16.x (seen on 0.16.1)"

WHY = (
    "megatron/core/transformer/moe/moe_utils.py binds te_general_gemm only inside its "
    "`try: import transformer_engine` block, but RouterGatingLinearFunction.forward/backward "
    "test `te_general_gemm is not None` unconditionally. Without Transformer Engine the name "
    "is unbound, so the first MoE router forward raises NameError. The test is evaluated "
    "before the `router_dtype != torch.float64` clause, so no moe_router_dtype (None, 'fp32', "
    "'fp64') avoids it. Binding the module global to None selects the torch.mm fallback that "
    "the function already contains."
)

OBSOLETE_WHEN = (
    "moe_utils defines te_general_gemm (e.g. `te_general_gemm = None` in its except branch) "
    "when Transformer Engine is absent, i.e. is_needed() returns False on a TE-less install."
)

_NAME = "te_general_gemm"


def _moe_utils():
    from megatron.core.transformer.moe import moe_utils

    return moe_utils


def is_needed() -> bool:
    """Probe: the gating function reads a global that the module never bound."""
    moe_utils = _moe_utils()
    fn = getattr(moe_utils, "RouterGatingLinearFunction", None)
    if fn is None:
        return False
    reads_name = _NAME in fn.forward.__code__.co_names or _NAME in fn.backward.__code__.co_names
    return reads_name and not hasattr(moe_utils, _NAME)


def is_applied() -> bool:
    moe_utils = _moe_utils()
    return getattr(moe_utils, "_spannorm_patched_" + _NAME, False)


def apply() -> bool:
    """Bind ``moe_utils.te_general_gemm = None``; idempotent. Returns True if it changed."""
    if is_applied() or not is_needed():
        return False
    moe_utils = _moe_utils()
    setattr(moe_utils, _NAME, None)
    setattr(moe_utils, "_spannorm_patched_" + _NAME, True)
    return True
