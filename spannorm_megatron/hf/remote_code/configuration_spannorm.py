# Configuration of SpanNorm-family transformers exported by spannorm_megatron
# (tools/convert_to_hf.py). Standalone: imports only transformers. Loaded through
#     AutoConfig.from_pretrained(folder, trust_remote_code=True)
"""SpanNormConfig: a decoder-only transformer whose layers use one normalization placement.

The placements are those of the spannorm_megatron contract (shared/design/norm-placements.md);
`modeling_spannorm.py` computes them. `norm_placement` picks the layer equation; the norm
modules each layer has are listed in `layer_norm_names` (and `first_layer_norm_names` for the
first layer only), with their megatron slot names.
"""

from transformers import PretrainedConfig

# placement -> (norms of every layer, norms of the first layer only, final norm by default)
PLACEMENT_NORMS = {
    "prenorm": (["input_layernorm", "pre_mlp_layernorm"], [], True),
    "postnorm": (["post_attention_norm", "post_mlp_norm"], [], False),
    "spannorm": (["post_attention_norm", "post_mlp_norm"], ["embedding_norm"], False),
    "deepnorm": (["post_attention_norm", "post_mlp_norm"], [], False),
    "perinorm": (["input_layernorm", "attention_output_norm", "pre_mlp_layernorm",
                  "mlp_output_norm"], [], True),
    "spannorm_clean": (["post_attention_norm", "post_mlp_norm"], [], True),
}


class SpanNormConfig(PretrainedConfig):
    """Shapes, placement and Scale Init settings of a SpanNorm-family causal LM.

    Args (beyond the usual transformers ones):
        norm_placement: prenorm, postnorm, spannorm, deepnorm, perinorm or spannorm_clean.
        normalization: "RMSNorm" or "LayerNorm" (LayerNorm norms have a bias).
        norm_eps: epsilon of every norm.
        layer_norm_names / first_layer_norm_names: the norm modules of each layer / of the first
            layer only (default: the placement's, see PLACEMENT_NORMS).
        first_layer_input_norm: spannorm: the first layer normalizes its attention input (N0).
        final_norm: norm before the LM head (default: the placement's rule).
        gated_mlp / hidden_act: SwiGLU (`silu(gate) * up`) or a plain `act(up)` MLP.
        linear_bias: biases on every linear layer (attention, MLP, experts, router).
        position_embedding_type: "rope", "learned_absolute" or "none".
        scale_init / scale_mode: the Scale Init settings of the run (recorded);
        branch_scale: the fixed multiplier on both branch outputs (scale_mode="forward"), else 1.
        residual_scale: deepnorm's `a` multiplying the residual stream (1 for the others).
        qk_layernorm: per-head norms (`normalization`'s type, head_dim wide) on queries and keys
            before RoPE (megatron-core's q_layernorm / k_layernorm).
        num_experts, num_experts_per_tok, moe_intermediate_size,
        shared_expert_intermediate_size: MoE (None experts: dense MLPs).
        moe_layer_pattern: 1 (MoE) or 0 (a dense MLP of intermediate_size) per layer (megatron's
            --moe-layer-freq); None: every layer MoE.
        moe_router_score_function ("softmax" or "sigmoid"), moe_router_pre_softmax,
        moe_router_num_groups / moe_router_group_topk (group-limited top-k),
        moe_router_topk_scaling_factor, moe_router_enable_expert_bias (a float32 `expert_bias`
            buffer added to the sigmoid scores for the choice only), moe_router_dtype (None,
            "fp32" or "fp64"): megatron-core's router settings, computed as megatron-core does
            (modeling_spannorm.py's SpanNormMoE).
        shared_expert_gate: the shared expert's output times sigmoid(x @ shared_expert_gate.T)
            (megatron's --moe-shared-expert-gate).
        megatron_model_config: the spannorm_megatron ModelConfig the model was exported from.
    """

    model_type = "spannorm"
    # the key/value cache in outputs, named past_key_values before transformers 5.25, cache since
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        norm_placement="spannorm",
        normalization="RMSNorm",
        norm_eps=1e-5,
        layer_norm_names=None,
        first_layer_norm_names=None,
        first_layer_input_norm=True,
        final_norm=None,
        gated_mlp=True,
        hidden_act="silu",
        linear_bias=False,
        position_embedding_type="rope",
        rope_theta=10000.0,
        rotary_percent=1.0,
        max_position_embeddings=1024,
        scale_init=None,
        scale_mode="init",
        branch_scale=1.0,
        residual_scale=None,
        num_experts=None,
        num_experts_per_tok=2,
        moe_intermediate_size=None,
        shared_expert_intermediate_size=None,
        qk_layernorm=False,
        moe_layer_pattern=None,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False,
        moe_router_dtype=None,
        shared_expert_gate=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        megatron_model_config=None,
        **kwargs,
    ):
        if norm_placement not in PLACEMENT_NORMS:
            raise ValueError(f"norm_placement={norm_placement!r} is not one of "
                             f"{sorted(PLACEMENT_NORMS)}")
        if normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization={normalization!r} must be RMSNorm or LayerNorm")
        if moe_router_score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_score_function={moe_router_score_function!r} must be "
                             f"softmax or sigmoid")
        if moe_router_dtype not in (None, "fp32", "fp64"):
            raise ValueError(f"moe_router_dtype={moe_router_dtype!r} must be None, fp32 or fp64")
        if (moe_router_num_groups is None) != (moe_router_group_topk is None):
            raise ValueError("set both moe_router_num_groups and moe_router_group_topk, or neither")
        if moe_layer_pattern is not None and len(moe_layer_pattern) != num_hidden_layers:
            raise ValueError(f"moe_layer_pattern has {len(moe_layer_pattern)} entries for "
                             f"{num_hidden_layers} layers")
        if position_embedding_type not in ("rope", "learned_absolute", "none"):
            raise ValueError(f"position_embedding_type={position_embedding_type!r} must be rope, "
                             f"learned_absolute or none")
        default_norms, default_first, default_final = PLACEMENT_NORMS[norm_placement]
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.norm_placement = norm_placement
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.layer_norm_names = list(default_norms if layer_norm_names is None else layer_norm_names)
        if first_layer_norm_names is None:
            first_layer_norm_names = default_first if first_layer_input_norm else []
        self.first_layer_norm_names = list(first_layer_norm_names)
        self.first_layer_input_norm = first_layer_input_norm
        self.final_norm = default_final if final_norm is None else final_norm
        self.gated_mlp = gated_mlp
        self.hidden_act = hidden_act
        self.linear_bias = linear_bias
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent={rotary_percent} must be in (0, 1]")
        self.rotary_percent = rotary_percent
        self.max_position_embeddings = max_position_embeddings
        self.scale_init = scale_init
        self.scale_mode = scale_mode
        self.branch_scale = branch_scale
        if residual_scale is None:
            residual_scale = (2.0 * num_hidden_layers) ** 0.25 if norm_placement == "deepnorm" else 1.0
        self.residual_scale = residual_scale
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.qk_layernorm = qk_layernorm
        self.moe_layer_pattern = None if moe_layer_pattern is None else [int(bool(m)) for m in
                                                                          moe_layer_pattern]
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_num_groups = moe_router_num_groups
        self.moe_router_group_topk = moe_router_group_topk
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.moe_router_dtype = moe_router_dtype
        self.shared_expert_gate = shared_expert_gate
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.megatron_model_config = megatron_model_config
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings

    def is_moe_layer(self, layer_idx):
        """Whether layer `layer_idx` (0-based) has experts (else a dense MLP)."""
        if not self.num_experts:
            return False
        return self.moe_layer_pattern is None or bool(self.moe_layer_pattern[layer_idx])
