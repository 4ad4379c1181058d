"""The placement registry: one entry per normalization placement.

Each entry names the layer class, which norm slots the layer has and which linear each norm may
be fused into under Transformer Engine, whether the model ends with a final norm, and the
default output-projection init. Adding a placement is adding one `Placement` to `PLACEMENTS`
(and, when megatron-core's layer cannot express it, a `compute` in `layers.py`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

from megatron.core.transformer.transformer_layer import TransformerLayer

from spannorm_megatron.errors import ConfigError
from spannorm_megatron.model.layers import (
    DeepNormLayer,
    PeriNormLayer,
    PostNormLayer,
    SpanNormCleanLayer,
    SpanNormLayer,
)


class Fusion(enum.Enum):
    """Where a norm's output goes, and so which Transformer Engine linear can absorb it."""

    NONE = "none"
    """Standalone norm: its output feeds a residual path or more than one consumer."""

    QKV = "qkv"
    """Only the attention's QKV projection reads it: `TELayerNormColumnParallelLinear`."""

    FC1 = "fc1"
    """Only a dense MLP's fc1 reads it (an MoE router reads it too, so MoE keeps it standalone)."""


@dataclass(frozen=True)
class Placement:
    name: str
    """Registry key, the value of `ModelConfig.norm_placement`."""

    equations: str
    """The layer's computation as written in the contract."""

    layer: type
    """`TransformerLayer` (sub)class that computes it."""

    norms: Mapping[str, Fusion]
    """Norm slot (a field of the layer's submodules) -> the linear it may be fused into."""

    final_norm: bool
    """Whether the contract puts a norm before the output layer."""

    default_scale_init: str = "megatron"
    """Output-projection init when `ModelConfig.scale_init` is None."""

    layer_params: tuple = ()
    """`ModelConfig` fields passed to the layer constructor as `ModuleSpec.params`."""

    @property
    def supports_forward_scaling(self) -> bool:
        # Forward-mode branch scaling lives in our placement layers, not megatron-core's layer.
        return self.layer is not TransformerLayer


PLACEMENTS: dict[str, Placement] = {
    p.name: p
    for p in (
        Placement(
            name="prenorm",
            equations="h = x + A(N1(x)); x' = h + F(N2(h))",
            layer=TransformerLayer,
            norms={"input_layernorm": Fusion.QKV, "pre_mlp_layernorm": Fusion.FC1},
            final_norm=True,
        ),
        Placement(
            name="postnorm",
            equations="h = N1(x + A(x)); x' = N2(h + F(h))",
            layer=PostNormLayer,
            norms={"post_attention_norm": Fusion.NONE, "post_mlp_norm": Fusion.NONE},
            final_norm=False,
        ),
        Placement(
            name="spannorm",
            equations="h = N1(x + A(xin)); x' = N2(x + F(h)); xin = N0(x) in layer 1, else x",
            layer=SpanNormLayer,
            # N1's output h feeds only the MLP, so Transformer Engine fuses N1 into fc1.
            norms={
                "embedding_norm": Fusion.NONE,
                "post_attention_norm": Fusion.FC1,
                "post_mlp_norm": Fusion.NONE,
            },
            final_norm=False,
            default_scale_init="sqrt_depth",
            layer_params=("first_layer_input_norm",),
        ),
        Placement(
            name="deepnorm",
            equations="h = N1(a*x + A(x)); x' = N2(a*h + F(h)); a = (2L)^(1/4)",
            layer=DeepNormLayer,
            norms={"post_attention_norm": Fusion.NONE, "post_mlp_norm": Fusion.NONE},
            final_norm=False,
            # DeepNet's own init: base sigma everywhere, then v, proj, fc1, fc2 / (8L)^(1/4).
            default_scale_init="none",
        ),
        Placement(
            name="perinorm",
            equations="h = x + N1o(A(N1i(x))); x' = h + N2o(F(N2i(h)))",
            layer=PeriNormLayer,
            norms={
                "input_layernorm": Fusion.QKV,
                "attention_output_norm": Fusion.NONE,
                "pre_mlp_layernorm": Fusion.FC1,
                "mlp_output_norm": Fusion.NONE,
            },
            final_norm=True,
        ),
        Placement(
            name="spannorm_clean",
            equations="h = N1(x + A(x)); x' = x + N2(h + F(h)); N2 gain initialized to 1/sqrt(L)",
            layer=SpanNormCleanLayer,
            norms={"post_attention_norm": Fusion.NONE, "post_mlp_norm": Fusion.NONE},
            final_norm=True,
        ),
    )
}


def get_placement(name: str) -> Placement:
    """The registry entry for `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return PLACEMENTS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"norm_placement={name!r} is not a known placement: choose one of "
            f"{sorted(PLACEMENTS)} (see shared/design/norm-placements.md)."
        ) from None
