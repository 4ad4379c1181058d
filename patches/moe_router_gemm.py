"""MoE router gating without Transformer Engine: ``NameError: te_general_gemm``.

Not a CPU issue: it hits any install without Transformer Engine (CPU or GPU), on every MoE
forward, whatever ``moe_router_dtype`` is. ``megatron/core/transformer/moe/moe_utils.py`` binds
``te_general_gemm`` only inside its ``try: import transformer_engine`` block, but
``RouterGatingLinearFunction.forward/backward`` test ``te_general_gemm is not None``
unconditionally, so the first MoE router forward raises NameError. The test is evaluated before
the ``router_dtype != torch.float64`` clause, so no ``moe_router_dtype`` (None, 'fp32', 'fp64')
avoids it. Binding the module global to None selects the torch.mm fallback that the function
already contains.
"""

from __future__ import annotations

from .contract import ABSENT, Patch

_NAME = "te_general_gemm"


def _moe_utils():
    from megatron.core.transformer.moe import moe_utils

    return moe_utils


def _probe(original) -> bool:
    """The gating function reads a global that the module never bound."""
    moe_utils = _moe_utils()
    fn = getattr(moe_utils, "RouterGatingLinearFunction", None)
    if fn is None:
        return False
    reads_name = _NAME in fn.forward.__code__.co_names or _NAME in fn.backward.__code__.co_names
    return reads_name and original(moe_utils, _NAME) is ABSENT


PATCH = Patch(
    "moe_router_gemm",
    target="megatron-core 0.16.x (seen on 0.16.1): moe_utils.te_general_gemm",
    why=__doc__,
    obsolete_when=(
        "moe_utils defines te_general_gemm (e.g. `te_general_gemm = None` in its except branch) "
        "when Transformer Engine is absent, i.e. is_needed() returns False on a TE-less install."
    ),
    probe=_probe,
    swaps=lambda: [(_moe_utils(), _NAME, None)],
)
