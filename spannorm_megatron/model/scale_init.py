"""Scale Init: how much the output projections of the residual branches are scaled.

The output projections are attention's `linear_proj` and the MLP's `linear_fc2` (every expert's
and the shared expert's too: megatron-core initializes all of them with
`TransformerConfig.output_layer_init_method`). L is the whole model's layer count,
`TransformerConfig.num_layers`, whatever the pipeline split.
"""

from __future__ import annotations

from typing import Union

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.placements import SCALE_INIT_RULES


def resolved_scale_init(config: ModelConfig) -> Union[str, float]:
    """The config's `scale_init`, or its placement's default when unset."""
    if config.scale_init is None:
        return config.placement.default_scale_init
    return config.scale_init


def branch_scale_factor(config: ModelConfig) -> float:
    """The factor c such that output projections have std c * sigma (scale_mode='init') or the
    branch outputs are multiplied by c (scale_mode='forward')."""
    scale_init = resolved_scale_init(config)
    if isinstance(scale_init, str):
        return SCALE_INIT_RULES[scale_init].factor(config.num_layers)
    return float(scale_init)


def output_projection_std(config: ModelConfig) -> float:
    """The std output projections are drawn with at initialization."""
    if config.scale_mode == "forward":
        return config.init_method_std
    return config.init_method_std * branch_scale_factor(config)


def forward_branch_scale(config: ModelConfig) -> float:
    """The fixed multiplier on branch outputs in the forward pass (1.0 unless scale_mode='forward')."""
    return branch_scale_factor(config) if config.scale_mode == "forward" else 1.0
