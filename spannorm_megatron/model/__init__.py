"""The model: norm-placement layers, their registry and specs, and the GPTModel builder."""

from spannorm_megatron.model.builder import build_gpt_model, build_model, transformer_config
from spannorm_megatron.model.placements import PLACEMENTS, Fusion, Placement, get_placement
from spannorm_megatron.model.specs import block_spec, layer_spec

__all__ = [
    "PLACEMENTS",
    "Fusion",
    "Placement",
    "block_spec",
    "build_gpt_model",
    "build_model",
    "get_placement",
    "layer_spec",
    "transformer_config",
]
