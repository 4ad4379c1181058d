"""Export rules: how each normalization placement becomes a Hugging Face model.

What a placement's layers hold comes from the placement registry (`spannorm_megatron.placements`):
its norm slots, the first-layer-only ones, the Llama names when a native `transformers` class
computes it, and its residual scale. Everything else about a layer (attention, MLP, MoE,
embeddings) is the same for all placements and is handled in `spannorm_megatron.hf.families`.

Norm names in the exported model:

* our own class (`SpanNormForCausalLM`): every norm keeps its megatron slot name
  (`input_layernorm`, `pre_mlp_layernorm`, `post_attention_norm`, `post_mlp_norm`,
  `embedding_norm`), under `model.layers.{i}.`;
* native Llama/Mixtral/Qwen2-MoE (prenorm only): `input_layernorm` and
  `post_attention_layernorm` (Llama's name for the norm in front of the MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.placements import Placement, no_residual_scale

REMOTE_CODE_PLACEMENTS = ("prenorm", "postnorm", "spannorm", "deepnorm", "perinorm",
                          "spannorm_clean")
"""Placements whose equation our own class (`remote_code/modeling_spannorm.py`) computes; that
file cannot import the registry, and tests/test_placements.py checks its copy against it."""


@dataclass(frozen=True)
class ExportRule:
    placement: Placement

    @property
    def norms(self) -> dict:
        """Slot every layer has -> its name in our own class (the slot's own name)."""
        return {slot: slot for slot in self.placement.layer_norms}

    @property
    def first_layer_norms(self) -> tuple:
        return self.placement.first_layer_norms

    def layer_norms(self, config: ModelConfig, layer: int, native: bool) -> List[Tuple[str, str]]:
        """(megatron slot, HF name) of the norms layer `layer` (0-based, global) has."""
        flag = self.placement.first_layer_norms_flag
        slots = self.placement.norms_of_layer(layer, flag is None or getattr(config, flag))
        names = self.placement.native_norms if native else {}
        return [(slot, names.get(slot, slot)) for slot in slots]

    def config_extras(self, config: ModelConfig) -> dict:
        """Fields of our HF config this placement needs beyond the shapes."""
        if self.placement.residual_scale is no_residual_scale:
            return {}
        return {"residual_scale": self.placement.residual_scale(config.num_layers)}


def export_rule(placement: Placement) -> ExportRule:
    """The rule for `placement` (a model's `ModelConfig.placement`), or a ConversionError naming
    the placements that have one."""
    if placement.name not in REMOTE_CODE_PLACEMENTS and placement.native_norms is None:
        raise ConversionError(
            f"norm_placement={placement.name!r} has no Hugging Face export rule: our own class "
            f"computes {list(REMOTE_CODE_PLACEMENTS)} and no native transformers class computes "
            f"it. Add its equation to spannorm_megatron/hf/remote_code/modeling_spannorm.py "
            f"(and the name to REMOTE_CODE_PLACEMENTS), or give the placement native_norms.")
    return ExportRule(placement)


def own_class_problems(config: ModelConfig) -> List[str]:
    """Why our own class cannot compute `config`; [] if it can. It computes every placement in
    REMOTE_CODE_PLACEMENTS with q/k norms, any head width (--kv-channels), partial RoPE
    (--rotary-percent), dense layers among MoE layers, and all of megatron-core's top-k routing
    (softmax or sigmoid scores, pre-softmax, expert bias, group-limited top-k, scaling factor)
    with a shared expert, gated or not."""
    problems = []
    if config.norm_placement not in REMOTE_CODE_PLACEMENTS:
        problems.append(f"our own class does not compute norm_placement="
                        f"{config.norm_placement!r}")
    return problems


def attention_problems(config: ModelConfig) -> List[str]:
    """Why the model's attention cannot be exported at all (by our class or a native one)."""
    if config.multi_latent_attention:
        return ["multi_latent_attention=True (multi-latent attention, with its YaRN RoPE and "
                "latent norms, is computed by neither our own class nor the native families "
                "exported here; the checkpoint itself loads, evaluates and generates with this "
                "stack)"]
    return []


def mixed_layers(config: ModelConfig) -> bool:
    return len(set(config.moe_layer_pattern)) > 1


def router_problems(config: ModelConfig) -> List[str]:
    """Why an MoE model's routing cannot be exported at all (by our class or a native one)."""
    if not config.is_moe:
        return []
    problems = []
    if "sinkhorn" in config.balancing_types:
        problems.append("moe_router_load_balancing_type='sinkhorn' routes differently at "
                        "inference (only top-k routing by softmax or sigmoid scores is "
                        "exported)")
    if config.moe_router_force_load_balancing:
        problems.append("moe_router_force_load_balancing=True routes by random logits (a "
                        "benchmark setting), which no exported model reproduces")
    if config.moe_apply_probs_on_input:
        problems.append("moe_apply_probs_on_input=True scales the experts' input, and the "
                        "exported classes scale their output")
    if config.moe_latent_size is not None:
        problems.append("moe_latent_size (latent projections around the experts) has no "
                        "exported form")
    return problems


def biased_routing(config: ModelConfig) -> bool:
    """DeepSeek-V3-style routing (sigmoid, expert bias, groups, scaled weights), which only
    GLM-4-MoE among the native classes computes."""
    return config.is_moe and (
        config.moe_router_score_function != "softmax" or config.moe_router_enable_expert_bias
        or config.moe_router_num_groups is not None
        or config.moe_router_topk_scaling_factor not in (None, 1.0))


def _softmax_routing_problems(config: ModelConfig) -> List[str]:
    """What the native softmax-routing classes (Mixtral, Qwen2-MoE, Qwen3-MoE) cannot hold."""
    problems = []
    if biased_routing(config):
        problems.append("sigmoid / expert-bias / group-limited / scaled routing (Mixtral, "
                        "Qwen2-MoE and Qwen3-MoE route with softmax over the top-k router "
                        "logits)")
    if config.is_moe and config.moe_router_pre_softmax:
        problems.append("moe_router_pre_softmax=True (the native classes renormalize the top-k)")
    return problems


def native_problems(config: ModelConfig) -> List[str]:
    """Why no native transformers class (Llama, Mixtral, Qwen2-MoE) can hold `config`; [] if one can."""
    from spannorm_megatron.model.scale_init import forward_branch_scale
    from spannorm_megatron.model.specs import final_norm_enabled

    rule = export_rule(config.placement)
    problems = []
    if rule.placement.native_norms is None:
        problems.append(f"norm_placement={config.norm_placement!r} (Llama-family classes are "
                        f"pre-norm)")
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization!r} (Llama uses RMSNorm)")
    if not config.swiglu:
        problems.append("swiglu=False (Llama's MLP is gated SiLU)")
    if config.position_embedding_type != "rope":
        problems.append(f"position_embedding_type={config.position_embedding_type!r} "
                        f"(Llama uses RoPE)")
    elif config.rotary_percent != 1.0:
        problems.append(f"rotary_percent={config.rotary_percent} (the native families rotate "
                        f"every dimension of a head; our own class rotates the first "
                        f"int(head_dim x rotary_percent), as megatron-core)")
    if not final_norm_enabled(config):
        problems.append("final_norm=False (Llama always has a final norm)")
    if forward_branch_scale(config) != 1.0:
        problems.append("scale_mode='forward' (Llama has no branch multiplier)")
    if config.is_moe and config.add_bias_linear:
        problems.append("add_bias_linear=True with MoE (Mixtral/Qwen2-MoE experts have no biases)")
    if config.is_moe and config.moe_shared_expert_gate:
        problems.append("moe_shared_expert_gate=True (the native exports write a shared expert "
                        "ungated: Qwen2-MoE's shared_expert_gate as 0 with down_proj x2; our own "
                        "class holds the trained gate)")
    if biased_routing(config):
        return problems + _glm4_moe_problems(config)
    problems += _softmax_routing_problems(config)
    if config.qk_layernorm and not config.is_moe:
        problems.append("qk_layernorm=True on a dense model (Llama has no q/k norms; the "
                        "native family with them is Qwen3-MoE)")
    if config.qk_layernorm and config.moe_shared_expert_intermediate_size:
        problems.append("qk_layernorm=True with a shared expert (Qwen3-MoE, the native family "
                        "with q/k norms, has no shared expert)")
    if config.is_moe and mixed_layers(config) and not config.qk_layernorm:
        problems.append("dense layers among MoE layers (moe_layer_freq) without qk_layernorm "
                        "(Mixtral and Qwen2-MoE as exported here are MoE in every layer; "
                        "Qwen3-MoE has mlp_only_layers but needs q/k norms)")
    return problems


def _glm4_moe_problems(config: ModelConfig) -> List[str]:
    """What GLM-4-MoE (sigmoid + e_score_correction_bias + groups + routed_scaling_factor, a
    shared expert, dense first layers) cannot hold."""
    problems = []
    if config.moe_router_score_function != "sigmoid":
        problems.append("expert bias / group-limited / scaled routing with softmax scores "
                        "(GLM-4-MoE, the native family with them, scores with sigmoid)")
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if groups is not None and config.moe_router_topk // group_topk != 2:
        problems.append(f"moe_router_topk / moe_router_group_topk = "
                        f"{config.moe_router_topk // group_topk} (GLM-4-MoE scores a group by "
                        f"its top-2 experts)")
    shared = config.moe_shared_expert_intermediate_size
    expert_ffn = config.resolved_moe_ffn_hidden_size
    if not shared or shared % expert_ffn:
        problems.append("no shared expert, or one whose width is not a multiple of "
                        "moe_ffn_hidden_size (GLM-4-MoE has n_shared_experts of that width)")
    pattern = config.moe_layer_pattern
    first_moe = pattern.index(1)
    if any(not moe for moe in pattern[first_moe:]):
        problems.append("dense layers after the first MoE layer (GLM-4-MoE: the first k "
                        "layers dense, first_k_dense_replace)")
    return problems


def native_family(config: ModelConfig) -> str:
    """Which native family would hold `config` (assuming `native_problems` is empty)."""
    if not config.is_moe:
        return "llama"
    if biased_routing(config):
        return "glm4_moe"
    if config.qk_layernorm:
        return "qwen3_moe"
    return "qwen2_moe" if config.moe_shared_expert_intermediate_size else "mixtral"
