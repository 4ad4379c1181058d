"""The ``run`` record: what model, layout and software wrote a checkpoint, and the check that the
model being loaded is the same model.

The record is stored twice with the same content: inside the dist checkpoint's common state
(key ``run``, so the checkpoint is self-contained; Megatron-LM's own ``args`` sit beside it, see
`megatron_args`) and as ``run.json`` beside it, which `read_run_record` and people read without
torch.

Before anything is loaded, the saved `ModelConfig` is compared with the current one. Fields that
change the parameters' shapes or meaning (placement, sizes, norm type, ...) must agree; a
mismatch there would otherwise surface as a shape error deep inside torch's distributed
checkpoint reader, or worse, load without error into a different function (a PreNorm
checkpoint into a SpanNorm model has the same shapes). Other fields (dropout, init, MoE loss
weights, the module flavour) may change between runs; their differences are only logged.
This comparison is also what a resume of `spannorm-train` checks before it starts, in the place
of Megatron-LM's ``check_checkpoint_args``, whose model arguments it covers
(`spannorm_megatron.training.checkpoint_args`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig

from .errors import CheckpointError
from .naming import RUN_RECORD_FILENAME

FORMAT = "spannorm_megatron.run/1"


def versions() -> Dict[str, str]:
    import megatron.core
    import torch

    import spannorm_megatron

    return {
        "torch": str(torch.__version__),
        "megatron-core": getattr(megatron.core, "__version__", "unknown"),
        "spannorm_megatron": spannorm_megatron.__version__,
    }


def current_layout() -> Dict[str, Optional[int]]:
    """The parallel sizes this process runs under (megatron-core's parallel_state)."""
    from megatron.core import parallel_state as ps

    from . import _dist

    return {
        "world_size": _dist.world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size":
            ps.get_virtual_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(with_context_parallel=True),
    }


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: dataclasses and namespaces as dicts, anything else as repr."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):  # e.g. torch's TorchVersion: plain str, or torch.load rejects it
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return jsonable(vars(value))
    return repr(value)


def build(
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    *,
    iteration: int,
    consumed_train_samples: int,
    consumed_valid_samples: int,
    contents: Dict[str, bool],
    optimizer: Optional[dict],
    args: Optional[dict],
    rng_sharding: Optional[str] = None,
) -> dict:
    """The record of this save (call on every rank; rank 0's copy is the one written).
    `rng_sharding` is how the RNG states are sharded (`rng.sharding`), None without them."""
    return {
        "format": FORMAT,
        "iteration": iteration,
        "consumed_train_samples": consumed_train_samples,
        "consumed_valid_samples": consumed_valid_samples,
        "norm_placement": model_config.norm_placement,
        "model_config": jsonable(model_config.to_dict()),
        "parallel_config": jsonable(parallel_config),
        "layout": current_layout(),
        "contents": contents,
        "rng_sharding": rng_sharding,
        "optimizer": optimizer,
        "versions": versions(),
        "args": jsonable(args or {}),
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def dumps(record: dict) -> str:
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def read_file(directory: str) -> dict:
    """``run.json`` of the checkpoint `directory`."""
    path = os.path.join(directory, RUN_RECORD_FILENAME)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} is missing: {directory} is not a checkpoint written by "
            f"spannorm_megatron.checkpoint (or it was damaged). Point at the save directory or "
            f"an iter_NNNNNNN directory inside it."
        ) from None
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the checkpoint is damaged; "
                              f"load another iteration.") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} record; load another iteration.")
    return record


# --------------------------------------------------------------------------- model comparison

# MoE settings that change what the trained model computes. The balancing losses' weights, the
# bias update rate, the router's dtype and the dispatcher may change between runs.
_ROUTING_FIELDS = (
    "moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax",
    "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_enable_expert_bias", "moe_expert_capacity_factor",
    "moe_pad_expert_input_to_capacity", "moe_token_drop_policy", "moe_shared_expert_gate",
    "moe_apply_probs_on_input",
)


# Multi-latent attention's shapes and its YaRN RoPE (which the trained weights are tied to).
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
               "rotary_scaling_factor", "mscale", "mscale_all_dim")


def _architecture(config: ModelConfig) -> Dict[str, Any]:
    """Resolved values of every field that fixes the parameters' shapes or their meaning."""
    from spannorm_megatron.model.specs import final_norm_enabled

    arch = {
        "norm_placement": config.norm_placement,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.resolved_num_query_groups,
        "ffn_hidden_size": config.resolved_ffn_hidden_size,
        "vocab_size": config.vocab_size,
        "normalization": config.normalization,
        "apply_layernorm_1p": config.apply_layernorm_1p,
        "swiglu": config.swiglu,
        "add_bias_linear": config.add_bias_linear,
        "untie_embeddings_and_output_weights": config.untie_embeddings_and_output_weights,
        "position_embedding_type": config.position_embedding_type,
        "final_norm": final_norm_enabled(config),
        "scale_mode": config.scale_mode,
        "num_experts": config.num_experts,
    }
    if config.position_embedding_type == "learned_absolute":
        arch["max_sequence_length"] = config.max_sequence_length
    # Fields added later enter only where they change the model, so a record written before
    # them (which loads with their defaults) describes the same architecture as before.
    if config.multi_latent_attention:
        arch["multi_latent_attention"] = True
        for name in _MLA_FIELDS:
            arch[name] = getattr(config, name)
        arch["rope_type"] = config.resolved_rope_type
    else:
        arch["kv_channels"] = config.resolved_kv_channels
    if config.position_embedding_type == "rope" or (
            config.multi_latent_attention and config.resolved_rope_type == "rope"):
        arch["rotary_percent"] = config.rotary_percent
    if config.norm_placement == "spannorm":
        arch["first_layer_input_norm"] = config.first_layer_input_norm
    if config.scale_mode == "forward":  # the factor is part of the forward computation
        arch["scale_init"] = config.scale_init
    if config.qk_layernorm:
        arch["qk_layernorm"] = True
    if config.is_moe:
        arch["moe_ffn_hidden_size"] = config.resolved_moe_ffn_hidden_size
        arch["moe_shared_expert_intermediate_size"] = config.moe_shared_expert_intermediate_size
        # Which layers are MoE, and how tokens are routed: the same weights under another
        # router (or with the trained expert bias ignored) compute another function.
        arch["moe_layer_pattern"] = config.moe_layer_pattern
        for name in _ROUTING_FIELDS:
            arch[name] = getattr(config, name)
        if config.moe_latent_size is not None:  # the experts' width and two more linears
            arch["moe_latent_size"] = config.moe_latent_size
    return arch


def saved_model_config(record: dict, where: str) -> ModelConfig:
    values = dict(record.get("model_config") or {})
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        return ModelConfig.from_dict({k: v for k, v in values.items() if k in known})
    except ValueError as err:
        raise CheckpointError(f"The model config recorded in {where} is not valid here: {err}") \
            from None


def compare(saved: ModelConfig, current: ModelConfig) -> Tuple[List[tuple], List[tuple]]:
    """(architecture differences, other differences), each a list of (field, saved, current)."""
    saved_arch, current_arch = _architecture(saved), _architecture(current)
    arch = [(k, saved_arch.get(k), current_arch.get(k))
            for k in sorted(set(saved_arch) | set(current_arch))
            if saved_arch.get(k) != current_arch.get(k)]
    arch_names = {k for k, _, _ in arch} | set(saved_arch) | set(current_arch)
    saved_all, current_all = saved.to_dict(), current.to_dict()
    other = [(k, saved_all[k], current_all[k]) for k in sorted(saved_all)
             if k not in arch_names and saved_all[k] != current_all[k]]
    return arch, other


def format_differences(differences: List[tuple]) -> str:
    return "; ".join(f"{name}: checkpoint {saved!r}, this run {current!r}"
                     for name, saved, current in differences)
