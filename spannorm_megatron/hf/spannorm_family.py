"""Our own class as a family: `SpanNormForCausalLM`, for every placement and everything the
native classes cannot express (q/k norms, dense layers among MoE layers, all of megatron-core's
top-k routing, the gated shared expert); its standalone files are in `remote_code/`.
"""

from __future__ import annotations

from dataclasses import fields

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.family import GAIN, SAME, H, L, Family, Rule, check_consistent
from spannorm_megatron.hf.rules import export_rule

ROUTER_DEFAULTS = {
    "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": False,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_topk_scaling_factor": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_dtype": None,
}
"""megatron-core's routing settings our class computes (ModelConfig field = config.json key),
with what a dense model writes: the remote configuration's defaults (a test keeps the two
equal; the remote files cannot import this package)."""


class SpanNorm(Family):
    """Our own class: every norm keeps its megatron slot name, config.json carries the exact
    ModelConfig (``megatron_model_config``). Beyond the common mapping: q/k norms
    (``self_attn.q_norm`` / ``k_norm``, with their LayerNorm biases), the expert bias (a float32
    buffer ``mlp.expert_bias``) and the shared-expert gate (``mlp.shared_expert_gate.weight``)."""

    name, architecture = "spannorm", "SpanNormForCausalLM"
    native = False
    float32 = ("mlp.expert_bias",)

    def mapping(self, config):
        return super().mapping(config) + [
            *(Rule(f"{L}self_attention.{x}_layernorm.{p}", f"{H}self_attn.{x}_norm.{p}",
                   GAIN if p == "weight" else SAME) for x in "qk" for p in ("weight", "bias")),
            Rule(L + "mlp.router.expert_bias", H + "mlp.expert_bias"),
            Rule(L + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight"),
        ]

    def config_fields(self, config):
        from spannorm_megatron.model.scale_init import forward_branch_scale, resolved_scale_init
        from spannorm_megatron.model.specs import final_norm_enabled

        rule = export_rule(config.placement)
        moe = config.is_moe
        ours = {
            "auto_map": {
                "AutoConfig": "configuration_spannorm.SpanNormConfig",
                "AutoModel": "modeling_spannorm.SpanNormModel",
                "AutoModelForCausalLM": "modeling_spannorm.SpanNormForCausalLM",
            },
            "norm_placement": config.norm_placement,
            "normalization": config.normalization,
            "norm_eps": config.norm_epsilon,
            "layer_norm_names": list(rule.norms.values()),
            "first_layer_norm_names": [hf for slot, hf in rule.layer_norms(config, 0, native=False)
                                       if slot in rule.first_layer_norms],
            "first_layer_input_norm": config.first_layer_input_norm,
            "final_norm": final_norm_enabled(config),
            "gated_mlp": config.swiglu,
            "linear_bias": config.add_bias_linear,
            "position_embedding_type": config.position_embedding_type,
            "rotary_percent": config.rotary_percent,
            "qk_layernorm": config.qk_layernorm,
            "scale_init": resolved_scale_init(config),
            "scale_mode": config.scale_mode,
            "branch_scale": forward_branch_scale(config),
            "residual_scale": 1.0,
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.moe_router_topk if moe else None,
            "moe_intermediate_size": config.resolved_moe_ffn_hidden_size if moe else None,
            "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
            "shared_expert_gate": moe and config.moe_shared_expert_gate,
            "moe_layer_pattern": list(config.moe_layer_pattern) if moe else None,
            **{key: getattr(config, key) if moe else dense
               for key, dense in ROUTER_DEFAULTS.items()},
            "hidden_dropout": config.hidden_dropout,
            "attention_dropout": config.attention_dropout,
            "megatron_model_config": config.to_dict(),
        }
        if rule.config_extras is not None:
            ours.update(rule.config_extras(config))
        return ours

    def model_config(self, hf, where):
        if not hf.get("megatron_model_config"):
            return super().model_config(hf, where)
        known = {f.name for f in fields(ModelConfig)}
        try:
            config = ModelConfig.from_dict({k: v for k, v in hf["megatron_model_config"].items()
                                            if k in known})
        except ValueError as err:
            raise ConversionError(f"{where}: megatron_model_config is not valid here: {err}") \
                from None
        check_consistent(config, hf, where)
        return config

    def read_fields(self, hf, values, problems):
        values.update(
            norm_placement=hf.get("norm_placement", "spannorm"),
            normalization=hf.get("normalization", "RMSNorm"),
            swiglu=hf.get("gated_mlp", True),
            add_bias_linear=hf.get("linear_bias", False),
            position_embedding_type=hf.get("position_embedding_type", "rope"),
            rotary_percent=float(hf.get("rotary_percent", 1.0)),
            first_layer_input_norm=hf.get("first_layer_input_norm", True),
            final_norm=hf.get("final_norm"),
            qk_layernorm=bool(hf.get("qk_layernorm", False)),
        )
        if hf.get("num_experts"):
            pattern = hf.get("moe_layer_pattern")
            values.update(
                num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                moe_ffn_hidden_size=hf.get("moe_intermediate_size"),
                moe_shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size"),
                moe_shared_expert_gate=bool(hf.get("shared_expert_gate", False)),
                moe_layer_freq=list(pattern) if pattern and 0 in pattern else 1,
                **{key: hf[key] for key in ROUTER_DEFAULTS if hf.get(key) is not None})
            if values.get("moe_router_enable_expert_bias"):
                # aux-loss-free balancing, as the GLM-4-MoE import assumes (the folder does not
                # record the training's balancing)
                values["moe_router_load_balancing_type"] = "none"
        if float(hf.get("branch_scale", 1.0)) != 1.0:
            problems.append("branch_scale != 1 without megatron_model_config (the Scale Init "
                            "settings that produce it are unknown)")
