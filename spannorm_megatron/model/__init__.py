"""The model: norm-placement layers, their specs, and the GPTModel builder (the placement
registry is `spannorm_megatron.placements`)."""

from spannorm_megatron.model.builder import build_gpt_model, build_model, transformer_config
from spannorm_megatron.model.specs import block_spec, layer_spec

__all__ = [
    "block_spec",
    "build_gpt_model",
    "build_model",
    "layer_spec",
    "transformer_config",
]
