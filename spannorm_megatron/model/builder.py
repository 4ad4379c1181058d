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
    moe = {}
    if config.is_moe:
        moe = dict(
            num_moe_experts=config.num_experts,
            moe_router_topk=config.moe_router_topk,
            moe_ffn_hidden_size=config.moe_ffn_hidden_size or config.resolved_ffn_hidden_size,
            moe_aux_loss_coeff=config.moe_aux_loss_coeff,
            moe_router_load_balancing_type=config.moe_router_load_balancing_type,
            moe_shared_expert_intermediate_size=config.moe_shared_expert_intermediate_size,
            moe_token_dispatcher_type=config.moe_token_dispatcher_type,
            moe_grouped_gemm=config.moe_grouped_gemm,
            moe_router_score_function=config.moe_router_score_function,
            moe_router_pre_softmax=config.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
            moe_router_num_groups=config.moe_router_num_groups,
            moe_router_group_topk=config.moe_router_group_topk,
            moe_router_dtype=config.moe_router_dtype,
            moe_router_enable_expert_bias=config.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=config.resolved_bias_update_rate,
            moe_z_loss_coeff=config.moe_z_loss_coeff,
            moe_expert_capacity_factor=config.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=config.moe_pad_expert_input_to_capacity,
            moe_token_drop_policy=config.moe_token_drop_policy,
            # megatron-core reads it for checkpoint keys (mixed layers are saved one by one) and
            # for its per-layer MoE logging; the specs follow the same pattern.
            moe_layer_freq=config.moe_layer_freq,
            moe_shared_expert_gate=config.moe_shared_expert_gate,
            moe_use_legacy_grouped_gemm=config.moe_use_legacy_grouped_gemm,
            moe_shared_expert_overlap=config.moe_shared_expert_overlap,
            moe_layer_recompute=config.moe_layer_recompute,
            moe_permute_fusion=config.moe_permute_fusion,
            moe_router_fusion=config.moe_router_fusion,
            moe_flex_dispatcher_backend=config.moe_flex_dispatcher_backend,
            moe_enable_deepep=config.moe_enable_deepep,
            moe_deepep_num_sms=config.moe_deepep_num_sms,
            moe_hybridep_num_sms=config.moe_hybridep_num_sms,
            moe_router_padding_for_quantization=config.moe_router_padding_for_quantization,
            moe_router_padding_for_fp8=config.moe_router_padding_for_fp8,
            moe_input_jitter_eps=config.moe_input_jitter_eps,
            moe_router_force_load_balancing=config.moe_router_force_load_balancing,
            moe_apply_probs_on_input=config.moe_apply_probs_on_input,
            moe_latent_size=config.moe_latent_size,
            moe_enable_routing_replay=config.moe_enable_routing_replay,
        )
    model_fields = dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.resolved_num_query_groups,
        ffn_hidden_size=config.resolved_ffn_hidden_size,
        kv_channels=config.resolved_kv_channels,
        normalization=config.normalization,
        layernorm_epsilon=config.norm_epsilon,
        layernorm_zero_centered_gamma=config.apply_layernorm_1p,
        gated_linear_unit=config.swiglu,
        activation_func=F.silu if config.swiglu else F.gelu,
        add_bias_linear=config.add_bias_linear,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        qk_layernorm=config.qk_layernorm,
        init_method_std=config.init_method_std,
        init_method=init_method_normal(config.init_method_std),
        output_layer_init_method=init_method_normal(output_projection_std(config)),
        **moe,
        **mla_fields(config),
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


def mla_fields(config: ModelConfig) -> dict:
    """The `MLATransformerConfig` fields of a multi-latent-attention model, as Megatron-LM's
    `core_transformer_config_from_args` fills them from the flags of the same names (the YaRN
    fields without a flag, original_max_position_embeddings, beta_fast and beta_slow, keep
    megatron-core's defaults there as here)."""
    if not config.multi_latent_attention:
        return {}
    return dict(
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_head_dim=config.qk_head_dim,
        qk_pos_emb_head_dim=config.qk_pos_emb_head_dim,
        v_head_dim=config.v_head_dim,
        rope_type=config.resolved_rope_type,
        rotary_base=config.rotary_base,
        rotary_percent=config.rotary_percent,
        rotary_scaling_factor=config.rotary_scaling_factor,
        mscale=config.mscale,
        mscale_all_dim=config.mscale_all_dim,
    )


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

    Process groups must exist (`spannorm_megatron.runtime.initialize`).
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
