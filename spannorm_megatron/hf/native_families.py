"""transformers' own classes as families: loadable without remote code.

``llama`` (`LlamaForCausalLM`, prenorm dense), ``mixtral`` (`MixtralForCausalLM`, prenorm MoE),
``qwen2_moe`` (`Qwen2MoeForCausalLM`, prenorm MoE with a shared expert), ``qwen3_moe``
(`Qwen3MoeForCausalLM`, prenorm MoE with q/k norms and optional dense layers) and ``glm4_moe``
(`Glm4MoeForCausalLM`, prenorm MoE with sigmoid / expert-bias / group routing). Qwen2-MoE's
shared-expert gate and q/k/v biases are `Neutral`: written as 0 and required to be 0 on import;
its shared expert's down_proj is stored x2, so ``sigmoid(0) * 2 * down = down`` exactly.
"""

from __future__ import annotations

from spannorm_megatron.hf.family import (
    DOUBLE,
    GAIN,
    H,
    L,
    Family,
    Neutral,
    Rule,
    head_sizes,
)


def _aux_loss_coeff(config) -> float:
    """HF MoE classes have one auxiliary loss: several of megatron-core's (a list of
    --moe-aux-loss-coeff) are written as their sum, what the router's total weighs."""
    coeff = config.moe_aux_loss_coeff
    return float(sum(coeff)) if isinstance(coeff, list) else coeff


class Llama(Family):
    name, architecture = "llama", "LlamaForCausalLM"

    def config_fields(self, config):
        return {**super().config_fields(config), "attention_bias": config.add_bias_linear,
                "mlp_bias": config.add_bias_linear, "pretraining_tp": 1}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        attention_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            problems.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (megatron's "
                            f"add_bias_linear puts biases on all linears or none)")
        values["add_bias_linear"] = attention_bias



class Mixtral(Family):
    name, architecture = "mixtral", "MixtralForCausalLM"
    moe, expert = "block_sparse_moe", ("w1", "w3", "w2")

    def config_fields(self, config):
        return {**super().config_fields(config),
                "intermediate_size": config.resolved_moe_ffn_hidden_size,
                "num_local_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "router_aux_loss_coef": _aux_loss_coeff(config), "router_jitter_noise": 0.0,
                "output_router_logits": False, "sliding_window": None}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        values.update(num_experts=hf["num_local_experts"], moe_router_topk=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["intermediate_size"])
        window = hf.get("sliding_window")
        if window is not None and window < values["max_sequence_length"]:
            problems.append(f"sliding_window={window} (sliding-window attention)")


class Qwen2Moe(Family):
    name, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"
    shared_down = DOUBLE  # its sigmoid gate is exported as 0: 1/2 * 2 * down

    def mapping(self, config):
        heads, groups, d = head_sizes(config)
        extra = []
        if not config.add_bias_linear:
            extra.append(Neutral(
                tuple(f"{H}self_attn.{x}_proj.bias" for x in "qkv"),
                ((heads * d,), (groups * d,), (groups * d,)), optional=True,
                why="the megatron model would need attention biases only on q/k/v, which it "
                    "cannot express (add_bias_linear puts biases on every linear)."))
        if config.moe_shared_expert_intermediate_size:
            extra.append(Neutral(
                (H + "mlp.shared_expert_gate.weight",), ((1, config.hidden_size),),
                why="megatron's shared expert here has no gate; only the exported form "
                    "(gate weight 0, down_proj x2) converts back."))
        return super().mapping(config) + extra

    def config_fields(self, config):
        return {**super().config_fields(config), "num_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "moe_intermediate_size": config.resolved_moe_ffn_hidden_size,
                "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
                "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "qkv_bias": True, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": config.num_layers,
                "router_aux_loss_coef": _aux_loss_coeff(config), "output_router_logits": False}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        values.update(num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["moe_intermediate_size"],
                      moe_shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size")
                      or None)
        if not hf.get("norm_topk_prob", False):
            problems.append("norm_topk_prob=false (megatron renormalizes the top-k probabilities)")
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            problems.append("dense layers between MoE layers (decoder_sparse_step / mlp_only_layers)")
        if hf.get("use_sliding_window"):
            problems.append("use_sliding_window=true (sliding-window attention)")


class Qwen3Moe(Family):
    """Qwen3-MoE: Mixtral-like experts and routing (softmax, top-k renormalized), per-head q/k
    RMSNorms, and dense layers listed in mlp_only_layers (megatron's --moe-layer-freq)."""

    name, architecture = "qwen3_moe", "Qwen3MoeForCausalLM"

    def mapping(self, config):
        return super().mapping(config) + _QK_NORMS

    def config_fields(self, config):
        return {**super().config_fields(config), "num_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "moe_intermediate_size": config.resolved_moe_ffn_hidden_size,
                "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [i for i, moe in enumerate(config.moe_layer_pattern)
                                    if not moe],
                "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": config.num_layers,
                "router_aux_loss_coef": _aux_loss_coeff(config), "output_router_logits": False}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        layers = hf["num_hidden_layers"]
        step = hf.get("decoder_sparse_step", 1)
        dense = set(hf.get("mlp_only_layers") or [])
        pattern = [0 if i in dense or (i + 1) % step else 1 for i in range(layers)]
        values.update(num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["moe_intermediate_size"], qk_layernorm=True,
                      moe_layer_freq=pattern if 0 in pattern else 1)
        if not hf.get("norm_topk_prob", False):
            problems.append("norm_topk_prob=false (megatron renormalizes the top-k probabilities)")
        if hf.get("attention_bias"):
            problems.append("attention_bias=true (megatron's add_bias_linear puts biases on "
                            "every linear)")
        if hf.get("use_sliding_window"):
            problems.append("use_sliding_window=true (sliding-window attention)")


_QK_NORMS = [
    Rule(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight", GAIN),
    Rule(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight", GAIN),
]


class Glm4Moe(Family):
    """GLM-4-MoE: DeepSeek-V3-style routing as megatron-core computes it with
    --moe-router-score-function sigmoid: sigmoid scores, the expert bias
    (e_score_correction_bias) added for the choice only, group-limited top-k scoring a group by
    its top-2 experts, weights renormalized and scaled (routed_scaling_factor); shared experts,
    the first k layers dense, optional q/k norms, full-width RoPE (partial_rotary_factor 1)."""

    name, architecture = "glm4_moe", "Glm4MoeForCausalLM"
    shared = "shared_experts"
    float32 = ("e_score_correction_bias",)  # transformers keeps it float32 too

    def mapping(self, config):
        return super().mapping(config) + _QK_NORMS + [
            Rule(L + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias")]

    def config_json(self, config, dtype, special=None):
        out = super().config_json(config, dtype, special)
        out["rope_parameters"] = dict(out["rope_parameters"], partial_rotary_factor=1.0)
        return out

    def config_fields(self, config):
        expert_ffn = config.resolved_moe_ffn_hidden_size
        return {**super().config_fields(config), "n_routed_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "moe_intermediate_size": expert_ffn,
                "n_shared_experts": config.moe_shared_expert_intermediate_size // expert_ffn,
                "n_group": config.moe_router_num_groups or 1,
                "topk_group": config.moe_router_group_topk or 1,
                "routed_scaling_factor": config.moe_router_topk_scaling_factor or 1.0,
                "norm_topk_prob": config.moe_router_topk > 1,
                "first_k_dense_replace": config.moe_layer_pattern.index(1),
                "use_qk_norm": config.qk_layernorm, "attention_bias": False,
                "partial_rotary_factor": 1.0, "num_mtp_layers": 0,
                "router_aux_loss_coef": _aux_loss_coeff(config)}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        layers, dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 1)
        groups, topk = hf.get("n_group", 1), hf["num_experts_per_tok"]
        expert_ffn = hf["moe_intermediate_size"]
        values.update(
            num_experts=hf["n_routed_experts"], moe_router_topk=topk,
            moe_ffn_hidden_size=expert_ffn,
            moe_shared_expert_intermediate_size=hf.get("n_shared_experts", 1) * expert_ffn or None,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none",
            moe_router_num_groups=groups if groups > 1 else None,
            moe_router_group_topk=hf.get("topk_group", 1) if groups > 1 else None,
            moe_router_topk_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            moe_layer_freq=[0] * dense + [1] * (layers - dense) if dense else 1,
            qk_layernorm=bool(hf.get("use_qk_norm", False)))
        rope = hf.get("rope_parameters") or {}
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)) != 1.0:
            problems.append("partial_rotary_factor != 1 (megatron rotates the whole head)")
        if hf.get("attention_bias"):
            problems.append("attention_bias=true (megatron's add_bias_linear puts biases on "
                            "every linear)")
        if groups > 1 and topk // hf.get("topk_group", 1) != 2:
            problems.append("num_experts_per_tok / topk_group != 2 (megatron scores a group by "
                            "its top topk/group_topk experts, GLM-4-MoE by its top 2)")
        if bool(hf.get("norm_topk_prob", True)) != (topk > 1):
            problems.append("norm_topk_prob differs from megatron's (renormalize when topk > 1)")
