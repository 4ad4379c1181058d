"""Megatron-LM flags that say what another flag says, accepted so that its scripts run (the
parser translates them into the flags they stand for)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spannorm_megatron.config.options import check, option


@dataclass
class MegatronSpellings:
    """Megatron-LM flags that say what another flag says, accepted so that its scripts run."""

    group_query_attention: bool = option(
        False, "Use --num-query-groups key/value heads; without it they count as one per head "
        "(Megatron-LM's switch).")
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        None, "Another way to give --num-virtual-stages-per-pipeline-rank: layers per model "
        "chunk.", at_least=1)
    make_vocab_size_divisible_by: int = option(
        128, "Pad the tokenizer's vocabulary to a multiple of this x the TP size.", at_least=1)
    use_rotary_position_embeddings: bool = option(
        False, "Deprecated spelling of --position-embedding-type rope (Megatron-LM's): sets it.")
    add_position_embedding: bool = option(
        True, "Deprecated (Megatron-LM's): --no-position-embedding says the model has no "
        "learned position embedding, which only --position-embedding-type rope (or the "
        "deprecated --use-rotary-position-embeddings) gives; with another type it is refused, "
        "as Megatron-LM refuses it.", flag="--no-position-embedding", negative=True)


    deprecated_use_mcore_models: bool = option(
        False, "Build megatron-core models: what this stack always does (Megatron-LM's "
        "deprecated switch; accepted, a no-op).", flag="--use-mcore-models")

    def __post_init__(self) -> None:
        check(self)
