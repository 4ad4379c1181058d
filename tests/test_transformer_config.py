"""The TransformerConfig a run's sections become is generated from the fields declared
`megatron=` (spannorm_megatron/config/model.py, parallel.py, performance.py): here it is
compared, field by field, with one written out keyword by keyword from megatron-core's own
TransformerConfig / MLATransformerConfig, for a dense model, an MoE model with router settings,
multi-latent attention, parallel layouts and precision/recompute choices."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
from megatron.core.utils import init_method_normal

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.options import declared, megatron_kwargs
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.config.performance import PerformanceConfig
from spannorm_megatron.model import transformer_config
from spannorm_megatron.model.fusions import runnable_fusions
from spannorm_megatron.runtime import megatron_device_kwargs

LAYERS, HIDDEN, HEADS, SIGMA = 4, 64, 4, 0.02
FFN = int((4 * HIDDEN * 2 / 3) / 64) * 64  # SwiGLU's rule, as Megatron-LM's


def _model(**fields) -> ModelConfig:
    return ModelConfig.recommended(
        norm_placement="spannorm", num_layers=LAYERS, hidden_size=HIDDEN,
        num_attention_heads=HEADS, vocab_size=128, max_sequence_length=64,
        transformer_impl="local", **fields)


def _dense_keywords(config: ModelConfig, **changes) -> dict:
    """What this stack sets beside the model's own fields, and the dense layer's fields."""
    keywords = dict(
        runnable_fusions(config), transformer_impl="local", cuda_graph_scope=[],
        pipeline_dtype=torch.float32, **megatron_device_kwargs(),
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=HEADS,
        ffn_hidden_size=FFN, kv_channels=HIDDEN // HEADS, normalization="RMSNorm",
        layernorm_epsilon=1e-5, layernorm_zero_centered_gamma=False, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        qk_layernorm=False, init_method_std=SIGMA, init_method=init_method_normal(SIGMA),
        # spannorm's default Scale Init: sigma / sqrt(L)
        output_layer_init_method=init_method_normal(SIGMA / math.sqrt(LAYERS)))
    keywords.update(changes)
    return keywords


def _comparable(value):
    if isinstance(value, functools.partial):  # init methods: a new partial per call
        return (value.func, value.args, value.keywords)
    return value


def _assert_same(generated, expected) -> None:
    assert type(generated) is type(expected)
    differ = {f.name: (getattr(generated, f.name), getattr(expected, f.name))
              for f in dataclasses.fields(expected)
              if _comparable(getattr(generated, f.name)) != _comparable(getattr(expected, f.name))}
    assert differ == {}


def test_a_dense_model():
    config = _model(num_query_groups=2, qk_layernorm=True, norm_epsilon=1e-6)
    expected = TransformerConfig(**_dense_keywords(
        config, num_query_groups=2, qk_layernorm=True, layernorm_epsilon=1e-6))
    _assert_same(transformer_config(config), expected)


def test_an_moe_model_with_router_settings():
    config = _model(
        num_experts=4, moe_router_topk=2, moe_layer_freq=[0, 1, 1, 1],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5, moe_router_num_groups=2, moe_router_group_topk=1,
        moe_router_dtype="fp32", moe_z_loss_coeff=1e-3, moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="seq_aux_loss", moe_expert_capacity_factor=1.5,
        moe_pad_expert_input_to_capacity=True, moe_token_drop_policy="position",
        moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True,
        moe_token_dispatcher_type="alltoall", moe_input_jitter_eps=0.01)
    expected = TransformerConfig(**_dense_keywords(
        config, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=FFN,
        moe_aux_loss_coeff=1e-2, moe_router_load_balancing_type="seq_aux_loss",
        moe_shared_expert_intermediate_size=32, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False, moe_router_score_function="sigmoid",
        moe_router_pre_softmax=False, moe_router_topk_scaling_factor=2.5,
        moe_router_num_groups=2, moe_router_group_topk=1, moe_router_dtype="fp32",
        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-3,
        moe_z_loss_coeff=1e-3, moe_expert_capacity_factor=1.5,
        moe_pad_expert_input_to_capacity=True, moe_token_drop_policy="position",
        moe_layer_freq=[0, 1, 1, 1], moe_shared_expert_gate=True,
        moe_use_legacy_grouped_gemm=False, moe_shared_expert_overlap=False,
        moe_layer_recompute=False, moe_permute_fusion=False, moe_router_fusion=False,
        moe_flex_dispatcher_backend="deepep", moe_enable_deepep=False, moe_deepep_num_sms=20,
        moe_hybridep_num_sms=16, moe_router_padding_for_quantization=False,
        moe_router_padding_for_fp8=False, moe_input_jitter_eps=0.01,
        moe_router_force_load_balancing=False, moe_apply_probs_on_input=False,
        moe_latent_size=None, moe_enable_routing_replay=False))
    _assert_same(transformer_config(config), expected)
    # The expert width is the dense one when not given; given, it is the expert's own.
    wider = dataclasses.replace(config, moe_ffn_hidden_size=96)
    assert transformer_config(wider).moe_ffn_hidden_size == 96


def test_multi_latent_attention():
    config = _model(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=8,
                    qk_pos_emb_head_dim=8, v_head_dim=12, rotary_scaling_factor=40.0,
                    mscale=0.707, mscale_all_dim=0.707, qk_layernorm=True)
    expected = MLATransformerConfig(**_dense_keywords(
        config, qk_layernorm=True, q_lora_rank=None, kv_lora_rank=16, qk_head_dim=8,
        qk_pos_emb_head_dim=8, v_head_dim=12, rope_type="yarn", rotary_base=10000,
        rotary_percent=1.0, rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707))
    _assert_same(transformer_config(config), expected)


MOE_ROUTER = dict(num_experts=4, moe_router_topk=2)
"""The experts of the layouts below (expert parallelism needs them)."""


@pytest.mark.parametrize("layout, keywords", [
    # Interleaved: the p2p overlap is on (Megatron-LM's default) and the sends are not batched.
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2,
          virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=2,
          microbatch_group_size_per_vp_stage=2, overlap_p2p_comm_warmup_flush=True),
     dict(tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2,
          virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=2,
          # unset: megatron-core's own default, the TP size (the section passes it resolved)
          expert_tensor_parallel_size=None, microbatch_group_size_per_vp_stage=2,
          overlap_p2p_comm=True, batch_p2p_comm=False, overlap_p2p_comm_warmup_flush=True)),
    # Without virtual stages nothing overlaps, whatever --no-overlap-p2p-communication says.
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1,
          context_parallel_size=2, expert_tensor_parallel_size=1,
          pipeline_model_parallel_comm_backend="ucc", use_ring_exchange_p2p=True),
     dict(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1,
          context_parallel_size=2, expert_tensor_parallel_size=1,
          pipeline_model_parallel_comm_backend="ucc", use_ring_exchange_p2p=True,
          overlap_p2p_comm=False, batch_p2p_comm=True)),
    (dict(pipeline_model_parallel_size=2, decoder_last_pipeline_num_layers=1),
     dict(pipeline_model_parallel_size=2, num_layers_in_last_pipeline_stage=1)),
    (dict(pipeline_model_parallel_size=2, account_for_embedding_in_pipeline_split=True,
          account_for_loss_in_pipeline_split=True),
     dict(pipeline_model_parallel_size=2, account_for_embedding_in_pipeline_split=True,
          account_for_loss_in_pipeline_split=True)),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|ttL"),
     dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|ttL")),
])
def test_a_parallel_layout(layout, keywords):
    config = _model(**MOE_ROUTER)
    expected = TransformerConfig(**_dense_keywords(
        config, **_moe_defaults(config), **keywords))
    generated = transformer_config(config, **ParallelConfig(**layout).transformer_kwargs())
    _assert_same(generated, expected)


def _moe_defaults(config: ModelConfig) -> dict:
    """The MoE keywords of `MOE_ROUTER` (what the MoE test above spells out) from the one
    generated at one rank: the layouts' test is about the layout's keywords."""
    tconfig = transformer_config(config)
    return {f.name: getattr(tconfig, f.name) for f in dataclasses.fields(tconfig)
            if f.name.startswith("moe_") or f.name == "num_moe_experts"}


@pytest.mark.parametrize("performance, keywords", [
    (dict(bf16=True, fp8_format="hybrid", fp8_recipe="tensorwise", fp8_margin=1,
          fp8_amax_history_len=16, fp8_amax_compute_algo="max", fp8_param_gather=True,
          first_last_layers_bf16=True, recompute_granularity="full", tp_comm_overlap=True,
          attention_softmax_in_fp32=True, attention_backend="flash"),
     dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, fp8="hybrid",
          fp8_recipe="tensorwise", fp8_margin=1, fp8_amax_history_len=16,
          fp8_amax_compute_algo="max", fp8_param=True, first_last_layers_bf16=True,
          # full recompute's defaults, as Megatron-LM's
          recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
          tp_comm_overlap=True, attention_softmax_in_fp32=True,
          attention_backend=AttnBackend.flash)),
    # FP8's settings reach megatron-core only in an FP8 run.
    (dict(fp16=True, fp8_recipe="tensorwise", fp8_amax_history_len=16,
          recompute_granularity="selective", attention_backend="local"),
     dict(fp16=True, params_dtype=torch.float16, pipeline_dtype=torch.float16,
          recompute_granularity="selective", attention_backend=AttnBackend.local,
          attention_softmax_in_fp32=False)),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
     dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2,
          attention_backend=AttnBackend.auto, attention_softmax_in_fp32=False)),
    # Megatron-LM's softmax default: the input's precision (megatron-core's own is fp32).
    (dict(), dict(attention_backend=AttnBackend.auto, attention_softmax_in_fp32=False)),
])
def test_precision_and_recompute(performance, keywords):
    config = _model()
    expected = TransformerConfig(**_dense_keywords(config, **keywords))
    generated = transformer_config(config, **PerformanceConfig(**performance).transformer_kwargs())
    _assert_same(generated, expected)


def test_the_model_s_megatron_fields_cannot_be_overridden():
    config = _model()
    for name in megatron_kwargs(config):
        with pytest.raises(ValueError, match="are model fields"):
            transformer_config(config, **{name: getattr(transformer_config(config), name)})


def test_every_megatron_name_is_a_transformer_config_field_set_by_one_section():
    fields = {f.name for f in dataclasses.fields(MLATransformerConfig)}
    owners = {}
    for section in (ModelConfig, ParallelConfig, PerformanceConfig):
        for field in declared(section):
            name = field.metadata["megatron"]
            if name:
                keyword = field.name if name is True else name
                assert keyword in fields, field.name
                assert owners.setdefault(keyword, section) is section, keyword
