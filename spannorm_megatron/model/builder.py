"""From one `ModelConfig` to megatron-core's `TransformerConfig` and `GPTModel`(s).

`build_model` is what a training job calls after the runtime has set up process groups; it
returns one `GPTModel` per virtual pipeline stage held by this rank (a list of one without
interleaving), as megatron-core's schedules expect.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.router_replay import RouterReplay
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
from megatron.core.utils import init_method_normal

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.options import megatron_kwargs
from spannorm_megatron.model.fusions import runnable_fusions
from spannorm_megatron.model.moe_kernels import check_moe_kernels
from spannorm_megatron.model.scale_init import output_projection_std
from spannorm_megatron.model.specs import block_spec, use_transformer_engine
from spannorm_megatron.runtime import base_seed, megatron_device_kwargs, set_seed


def transformer_config(config: ModelConfig, **overrides) -> TransformerConfig:
    """megatron-core's `TransformerConfig` for `config`.

    `overrides` are `TransformerConfig` fields that are not the model's shape: parallel sizes
    (`tensor_model_parallel_size`, `sequence_parallel`, ...), precision (`bf16`, `params_dtype`),
    recompute options and the like. The model's own fields cannot be overridden here.
    """
    # The fields declared with `megatron=` (config/model.py), MoE's only for an MoE model and
    # multi-latent attention's only with it, as Megatron-LM's core_transformer_config_from_args
    # fills them from its flags of the same names (the YaRN fields without a Megatron-LM flag,
    # original_max_position_embeddings, beta_fast and beta_slow, keep megatron-core's defaults
    # there as here); what is not a field's value is added here.
    model_fields = dict(
        megatron_kwargs(config),
        activation_func=F.silu if config.swiglu else F.gelu,
        init_method=init_method_normal(config.init_method_std),
        output_layer_init_method=init_method_normal(output_projection_std(config)),
    )
    clashes = sorted(set(overrides) & set(model_fields))
    if clashes:
        raise ValueError(
            f"{clashes} are model fields: set them on ModelConfig, not as TransformerConfig overrides."
        )
    defaults = dict(
        # Megatron-LM's defaults (every fusion allowed) where the kernels run; a run's own
        # switches come as overrides (PerformanceConfig.transformer_kwargs).
        **runnable_fusions(config),
        transformer_impl="transformer_engine" if use_transformer_engine(config) else "local",
        # The whole layer, spelled as megatron-core 0.16 wants it (its default "full" warns).
        cuda_graph_scope=[],
        # Activations cross pipeline stages in the compute dtype.
        pipeline_dtype=(torch.bfloat16 if overrides.get("bf16")
                        else torch.float16 if overrides.get("fp16")
                        else overrides.get("params_dtype", torch.float32)),
        # Without a GPU, weights are built on the host (use_cpu_initialization).
        **megatron_device_kwargs(),
    )
    config_class = MLATransformerConfig if config.multi_latent_attention else TransformerConfig
    return config_class(**{**defaults, **model_fields, **overrides})


def build_gpt_model(
    config: ModelConfig,
    tconfig: TransformerConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """One `GPTModel` (one pipeline stage, or the whole model without pipelining).

    MoE options whose kernels this machine lacks are refused first (ConfigError), rather than
    failing inside megatron-core's module construction."""
    transformer_engine = use_transformer_engine(config)
    check_moe_kernels(config, transformer_engine)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec(config, tconfig, vp_stage=vp_stage,
                                          transformer_engine=transformer_engine),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        vp_stage=vp_stage,
    )
    # megatron-core builds the learned position table as a plain torch.nn.Embedding in fp32
    # whatever params_dtype says (Megatron-LM's Float16Module then casts it with the rest). Here a
    # bf16/fp16 model is built in its dtype directly, so the table follows it; in fp32 its sum
    # with the word embedding would reach the first norm in fp32, beside half-precision gains.
    position_table = getattr(getattr(model, "embedding", None), "position_embeddings", None)
    if position_table is not None:
        position_table.to(dtype=tconfig.params_dtype)
    return model


def build_model(config: ModelConfig, tconfig: TransformerConfig) -> List[GPTModel]:
    """The model chunks this rank holds: one per virtual pipeline stage (one without interleaving).

    Process groups must exist (`spannorm_megatron.process.initialize`).
    """
    vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = range(vp_size) if vp_size is not None else [None]
    if config.moe_enable_routing_replay:
        # megatron-core keeps every router it ever built in one process-wide list and hands
        # replay data out by position in it: only this model's routers may be there.
        RouterReplay.clear_global_router_replay_instances()
    chunks = [
        build_gpt_model(
            config,
            tconfig,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp,
        )
        for vp in stages
    ]
    # The layers reseeded the streams (model/seeding.py); training's dropout starts from the
    # run's own per-stage seeds, as Megatron-LM's does.
    set_seed(base_seed())
    return chunks
