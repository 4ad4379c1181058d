"""The Hugging Face families this stack converts to and from, by name and by architecture.

``llama``, ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``glm4_moe`` (transformers' own classes,
`native_families.py`) and ``spannorm`` (our own `SpanNormForCausalLM`, `spannorm_family.py`).
How a family maps weights and config.json: `family.py`.
"""

from __future__ import annotations

from typing import Dict, Tuple

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.family import Family
from spannorm_megatron.hf.native_families import Glm4Moe, Llama, Mixtral, Qwen2Moe, Qwen3Moe
from spannorm_megatron.hf.spannorm_family import SpanNorm

FAMILIES: Dict[str, Family] = {f.name: f for f in (Llama(), Mixtral(), Qwen2Moe(), Qwen3Moe(),
                                                    Glm4Moe(), SpanNorm())}
ARCHITECTURES = {f.architecture: f for f in FAMILIES.values()}


def family_of(hf: dict, where: str) -> Family:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if hf.get("model_type") in FAMILIES:
        return FAMILIES[hf["model_type"]]
    raise ConversionError(
        f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; this tool "
        f"converts {sorted(ARCHITECTURES)} (model_type {sorted(FAMILIES)}).")


def model_config_from_hf(hf: dict, where: str) -> Tuple[Family, ModelConfig]:
    """(family, the megatron ModelConfig) of an HF config.json."""
    family = family_of(hf, where)
    return family, family.model_config(hf, where)
