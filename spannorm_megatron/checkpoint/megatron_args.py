"""The checkpoint's ``args``: an ``argparse.Namespace`` under Megatron-LM's attribute names, as
Megatron-LM's ``save_checkpoint`` stores its own arguments.

Megatron-LM (core_v0.16.1, ``megatron/training/checkpointing.py``) reads it in three places:

- ``load_checkpoint``: the saved TP and PP sizes (without them it warns, assumes 1 and 1, and
  ignores the RNG states), ``world_size`` and ``data_parallel_size`` (whether the rerun state
  applies), ``no_save_rng`` / ``no_save_optim`` (whether to ask for RNG and optimizer state), and
  the training position: ``consumed_train_samples``, ``skipped_train_samples``,
  ``consumed_valid_samples``. Without ``args`` it logs "could not find arguments in the
  checkpoint" and restarts the data at sample 0 while the iteration and the LR schedule go on.
- ``check_checkpoint_args`` (on every load but ``--finetune``): ``num_layers``, ``hidden_size``,
  ``num_attention_heads``, ``add_position_embedding``; with a ``--vocab-file`` tokenizer also
  ``max_position_embeddings``, ``make_vocab_size_divisible_by``, ``tokenizer_type`` (and
  ``padded_vocab_size`` outside dist checkpoints); ``data_parallel_random_init`` and
  ``global_batch_size`` when the run uses those features; TP/PP only for non-dist checkpoints.
- ``load_args_from_checkpoint`` (``--use-checkpoint-args``): the model's sizes and structure,
  position embeddings, biases, activation, norm, dropout, MoE settings, the hybrid/Mamba and
  heterogeneous-layer settings (GPT models hold Megatron-LM's defaults there), the tokenizer,
  ``padded_vocab_size``, ``ckpt_format`` and, with ``--use-mp-args-from-checkpoint-args``, the
  TP/PP/VPP/EP sizes.

`build` writes all of these. The values come from three places, later ones winning:
Megatron-LM's defaults for what this stack has no flag for (a GPT run of Megatron-LM that never
set them holds the same), the run's flags (`flags`: the parsed `spannorm-train` namespace, whose
names are Megatron-LM's), and what the checkpoint itself is: the `ModelConfig` (resolved as
Megatron-LM's ``validate_args`` resolves it: FFN size, KV channels, GQA), the live parallel
layout and the training position. A checkpoint written without flags (an HF import, a test)
thus still describes its model, layout and position.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, Optional

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.options import options
from spannorm_megatron.config.parallel import ParallelConfig

from .run_record import jsonable

CKPT_FORMAT = "torch_dist"

# Never written: an attribute of this name in the checkpoint makes Megatron-LM's
# load_args_from_checkpoint set add_bias_linear = not disable_bias_linear (Megatron-LM's own
# --disable-bias-linear stores add_bias_linear=False, as ours does).
_NOT_MEGATRON_ATTRIBUTES = ("disable_bias_linear",)

# What a Megatron-LM GPT run holds for arguments this stack has no flag for (core_v0.16.1's
# arguments.py defaults); the TransformerConfig-backed ones are read from the installed
# megatron-core below, which is where Megatron-LM's flags take their defaults from.
_MEGATRON_DEFAULTS = {
    # Flags of ours too (training.arguments.MegatronSpellings); these serve saves without flags.
    "add_position_embedding": True,     # only --no-position-embedding (deprecated) clears it
    "use_rotary_position_embeddings": False,
    "squared_relu": False,
    "hybrid_override_pattern": None,
    "spec": None,
    "hybrid_attention_ratio": 0.0,
    "hybrid_mlp_ratio": 0.0,
    "heterogeneous_layers_config_path": None,
    "heterogeneous_layers_config_encoded_json": None,
    "tiktoken_pattern": None,
    "vocab_file": None,
    "data_parallel_random_init": False,
    "phase_transition_iterations": None,
    "num_layers_per_virtual_pipeline_stage": None,
    "skipped_train_samples": 0,
}
# Flags of ours that a save without flags (an HF import, a test) does not know: present, and
# None, as Megatron-LM's own None defaults say "not given".
_FROM_FLAGS_ONLY = ("tokenizer_type", "tokenizer_model", "make_vocab_size_divisible_by",
                    "global_batch_size", "micro_batch_size", "train_iters")
_TRANSFORMER_CONFIG_DEFAULTS = (
    "add_qkv_bias", "apply_query_key_layer_scaling", "rotary_interleaved", "mamba_state_dim",
    "mamba_head_dim", "mamba_num_groups", "mamba_num_heads", "is_hybrid_model", "moe_latent_size",
)


# Our dests (field names) that Megatron-LM's parser stores under another name, for the same
# flag (its table: tests/data/megatron_lm/). Both names are written: Megatron-LM's dest, and
# ours, which is also the name its load_args_from_checkpoint reads for apply_layernorm_1p.
MEGATRON_DESTS = {
    "max_sequence_length": "max_position_embeddings",
    "norm_epsilon": "layernorm_epsilon",
    "apply_layernorm_1p": "layernorm_zero_centered_gamma",
    "fp8_format": "fp8",
    "virtual_pipeline_model_parallel_size": "num_virtual_stages_per_pipeline_rank",
}


def _with_megatron_dests(values: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(values)
    out.update({MEGATRON_DESTS[k]: v for k, v in values.items() if k in MEGATRON_DESTS})
    return out


def _transformer_config_defaults() -> Dict[str, Any]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    return {name: defaults[name] for name in _TRANSFORMER_CONFIG_DEFAULTS if name in defaults}


def _transformer_impl(config: ModelConfig) -> str:
    if config.transformer_impl != "auto":
        return config.transformer_impl
    from spannorm_megatron.model.specs import transformer_engine_available

    return "transformer_engine" if transformer_engine_available() else "local"


def model_arguments(config: ModelConfig) -> Dict[str, Any]:
    """The model's arguments under Megatron-LM's names, resolved as its validate_args does."""
    values = {f.name: getattr(config, f.name) for f in options(ModelConfig)}
    values.update(
        padded_vocab_size=config.vocab_size,
        ffn_hidden_size=config.resolved_ffn_hidden_size,
        kv_channels=config.resolved_kv_channels,
        # Megatron-LM counts --num-query-groups only with --group-query-attention.
        group_query_attention=config.num_query_groups is not None,
        num_query_groups=config.num_query_groups,
        transformer_impl=_transformer_impl(config),
    )
    if config.is_moe:
        values["moe_ffn_hidden_size"] = (config.moe_ffn_hidden_size
                                         or config.resolved_ffn_hidden_size)
    return _with_megatron_dests(values)


def build(
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    layout: Dict[str, Optional[int]],
    *,
    flags: Any,
    iteration: int,
    consumed_train_samples: int,
    consumed_valid_samples: int,
    contents: Dict[str, bool],
) -> argparse.Namespace:
    """Megatron-LM's ``args`` for this save (see the module docstring). `flags` is the run's
    parsed flags (a namespace or dict; anything else, e.g. None, counts as no flags), `layout`
    the live parallel sizes (`run_record.current_layout()`), `contents` what the save holds."""
    given = jsonable(flags) if flags is not None else {}
    given = given if isinstance(given, dict) else {}
    values: Dict[str, Any] = dict.fromkeys(_FROM_FLAGS_ONLY)
    values.update(_MEGATRON_DEFAULTS)
    values.update(_transformer_config_defaults())
    values.update(_with_megatron_dests({k: v for k, v in given.items()
                                        if k not in _NOT_MEGATRON_ATTRIBUTES}))
    values.update(jsonable(model_arguments(model_config)))
    values.update(
        tensor_model_parallel_size=layout["tensor_model_parallel_size"],
        pipeline_model_parallel_size=layout["pipeline_model_parallel_size"],
        virtual_pipeline_model_parallel_size=layout["virtual_pipeline_model_parallel_size"],
        num_virtual_stages_per_pipeline_rank=layout["virtual_pipeline_model_parallel_size"],
        context_parallel_size=layout["context_parallel_size"],
        expert_model_parallel_size=layout["expert_model_parallel_size"],
        expert_tensor_parallel_size=layout["expert_tensor_parallel_size"],
        world_size=layout["world_size"],
        data_parallel_size=layout["data_parallel_size"],
        sequence_parallel=parallel_config.sequence_parallel,
        use_distributed_optimizer=parallel_config.use_distributed_optimizer,
        # Our distributed-optimizer state is saved fully reshardable (state.SHARDING_METADATA).
        dist_ckpt_optim_fully_reshardable=parallel_config.use_distributed_optimizer,
        ckpt_format=CKPT_FORMAT,
        use_dist_ckpt=True,
        no_save_optim=not (contents.get("optimizer") and contents.get("opt_param_scheduler")),
        no_save_rng=not contents.get("rng"),
        iteration=iteration,
        consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=consumed_valid_samples,
    )
    # Megatron-LM requires a training length; a checkpoint saved without flags (an HF import)
    # has none but the model's maximum, which is what validate_args accepts.
    if values.get("seq_length") is None:
        values["seq_length"] = model_config.max_sequence_length
    return argparse.Namespace(**values)
