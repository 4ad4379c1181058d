"""The model configuration users write: one dataclass, validated before any process group exists.

`ModelConfig` says *what* model to build (placement, shapes, MoE, init); how it is laid out on
devices is the parallel runtime's business. `spannorm_megatron.model.builder` turns it into a
megatron-core `TransformerConfig` and `GPTModel`.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Union

from spannorm_megatron.config.model_values import (
    DEFAULT_BIAS_UPDATE_RATE,
    FLEX_BACKENDS,
    LOAD_BALANCING_TYPES,
    MODERN_RECIPE,
    NORMALIZATIONS,
    POSITION_EMBEDDINGS,
    ROPE_TYPES,
    ROUTER_DTYPES,
    SCALE_MODES,
    SCORE_FUNCTIONS,
    TOKEN_DISPATCHERS,
    TOKEN_DROP_POLICIES,
    TRANSFORMER_IMPLS,
    UNSUPPORTED_POSITION_EMBEDDINGS,
    parse_moe_layer_freq,
    parse_scale_init,
)
from spannorm_megatron.config.moe_rules import check_moe
from spannorm_megatron.config.options import check, derived, option
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.placements import (
    PLACEMENTS,
    Placement,
    get_placement,
    placement_names,
    scale_init_help,
)


def recipe_flags(values: dict = MODERN_RECIPE) -> List[str]:
    """`values` (ModelConfig fields) as `spannorm-train` / Megatron-LM flags."""
    from spannorm_megatron.config.options import flag_of

    flags = []
    by_name = {f.name: f for f in fields(ModelConfig)}
    for name, value in values.items():
        field = by_name[name]
        if isinstance(value, bool):
            if value != field.default:  # a switch: given only to change its default
                flag = flag_of(field)
                flags.append(flag if value or field.metadata["negative"] else "--no-" + flag[2:])
        else:
            flags += [flag_of(field), str(value)]
    return flags


# The declarations of fields megatron-core's TransformerConfig takes (`options.megatron_kwargs`)
# only for MoE models, and only with multi-latent attention (MLATransformerConfig's).
_MOE = dict(megatron=True, megatron_if="is_moe")
_MLA = dict(megatron=True, megatron_if="multi_latent_attention")


@dataclass
class ModelConfig:
    """A GPT-style decoder whose layers use one normalization placement.

    Every field is a `spannorm-train` flag (`spannorm_megatron.config.options`) whose default is
    Megatron-LM's (a GPT-2-like layer: LayerNorm, learned positions, GeLU, biases, tied
    embeddings, dropout 0.1); `MODERN_RECIPE` holds the Llama-like settings this project
    recommends.
    """

    norm_placement: str = option(
        "spannorm", "Norm placement (shared/design/norm-placements.md).",
        choices=placement_names)
    num_layers: int = option(
        4, "Transformer layers in the whole model, all pipeline stages together (the L of "
        "Scale Init).", at_least=1, required=True, megatron=True)
    hidden_size: int = option(256, "Width of the residual stream.", at_least=1, required=True,
                              megatron=True)
    num_attention_heads: int = option(4, "Query heads.", at_least=1, required=True, megatron=True)
    num_query_groups: Optional[int] = option(
        None, "Key/value heads for grouped-query attention (with --group-query-attention); "
        "unset: one per query head.", at_least=1, megatron=True)
    kv_channels: Optional[int] = option(
        None, "Width of every attention head (queries, keys and values), independent of "
        "--hidden-size; unset: --hidden-size / --num-attention-heads. Multi-latent attention "
        "reads --qk-head-dim, --qk-pos-emb-head-dim and --v-head-dim instead.", at_least=1,
        megatron=True)
    ffn_hidden_size: Optional[int] = option(
        None, "Dense MLP inner width; unset: 4 x hidden size, or with --swiglu "
        "int(8 x hidden / 3 / 64) x 64 (Megatron-LM's rule).", at_least=1, megatron=True)
    normalization: str = option("LayerNorm", "Type of every norm.", choices=NORMALIZATIONS,
                                megatron=True)
    norm_epsilon: float = option(1e-5, "Epsilon added to the variance inside every norm.",
                                 above=0.0, megatron="layernorm_epsilon")
    apply_layernorm_1p: bool = option(
        False, "Store norm gains as (gain - 1), initialized at zero, so weight decay pulls them "
        "to 1.", megatron="layernorm_zero_centered_gamma")
    swiglu: bool = option(False, "Gated SiLU MLP (SwiGLU) instead of a plain GeLU MLP.",
                          megatron="gated_linear_unit")
    add_bias_linear: bool = option(
        True, "Biases in the attention and MLP linear layers; --disable-bias-linear drops them.",
        flag="--disable-bias-linear", negative=True, megatron=True)
    position_embedding_type: str = option(
        "learned_absolute", "Position embedding: learned_absolute, rope or none (mrope and "
        "relative are refused).", choices=POSITION_EMBEDDINGS)
    rotary_base: int = option(10000, "RoPE base frequency.", at_least=1, **_MLA)
    rotary_percent: float = option(
        1.0, "Fraction of each attention head's dimensions that RoPE rotates (the first "
        "int(head dim x fraction)); the rest pass unrotated.", above=0.0, **_MLA)
    rope_type: Optional[str] = option(
        None, "RoPE variant: rope, or yarn (YaRN scaling, --rotary-scaling-factor, --mscale, "
        "--mscale-all-dim; multi-latent attention only). Unset: yarn with "
        "--multi-latent-attention, else rope.", choices=ROPE_TYPES, **_MLA)
    max_sequence_length: int = option(
        1024, "Longest sequence the position embeddings support (at least --seq-length).",
        flag="--max-position-embeddings", at_least=1, required=True)
    vocab_size: int = derived(
        32000, "Vocabulary size as the model sees it (already padded, if padding is wanted).",
        source="the tokenizer, padded by --make-vocab-size-divisible-by", at_least=1)
    untie_embeddings_and_output_weights: bool = option(
        False, "Separate input embedding and output layer weights (Llama style); unset: the "
        "output layer reuses the embedding.")
    init_method_std: float = option(
        0.02, "Base init std sigma of every weight matrix; output projections may be scaled, "
        "see --scale-init.", above=0.0, megatron=True)
    hidden_dropout: float = option(0.1, "Dropout on each residual branch output.",
                                   at_least=0.0, below=1.0, megatron=True)
    attention_dropout: float = option(0.1, "Dropout on attention probabilities.",
                                      at_least=0.0, below=1.0, megatron=True)
    scale_init: Union[str, float, None] = option(
        None, scale_init_help(), parse=parse_scale_init)
    scale_mode: str = option(
        "init", "init applies --scale-init to the initial weights; forward keeps them at sigma "
        "and multiplies both branch outputs by the same factor in every forward pass.",
        choices=SCALE_MODES)
    first_layer_input_norm: bool = option(
        True, "SpanNorm: normalize the embedding before the first layer's attention (N0).")
    final_norm: Optional[bool] = option(
        None, "Norm before the output layer; unset: the placement's rule from the contract.")
    num_experts: Optional[int] = option(None, "MoE experts per layer; unset: dense MLPs.",
                                        at_least=1,
                                        megatron="num_moe_experts", megatron_if="is_moe")
    moe_router_topk: int = option(2, "Experts each token is routed to.", at_least=1, **_MOE)
    moe_ffn_hidden_size: Optional[int] = option(
        None, "Inner width of each expert; unset: --ffn-hidden-size.", at_least=1, **_MOE)
    moe_aux_loss_coeff: Union[float, List[float]] = option(
        0.0, "Weight of the router's load-balancing auxiliary loss (1e-2 is a usual start); "
        "one per --moe-router-load-balancing-type when several are given.", at_least=0.0,
        nargs="+", parse=float, **_MOE)
    moe_router_load_balancing_type: Union[str, List[str]] = option(
        "aux_loss", "megatron-core's load balancing: aux_loss (per micro-batch), seq_aux_loss "
        "(per sequence), global_aux_loss (over the global batch), sinkhorn, or none (e.g. with "
        "--moe-router-enable-expert-bias); several combine, each with its --moe-aux-loss-coeff.",
        choices=LOAD_BALANCING_TYPES, nargs="+", parse=str, **_MOE)
    moe_router_score_function: str = option(
        "softmax", "Router score: softmax, or sigmoid (DeepSeek-V3; normalized over the chosen "
        "experts when topk > 1).", choices=SCORE_FUNCTIONS, **_MOE)
    moe_router_pre_softmax: bool = option(
        False, "Softmax over all experts before the top-k choice (needed for topk 1 with "
        "softmax scoring).", **_MOE)
    moe_router_topk_scaling_factor: Optional[float] = option(
        None, "Multiplier on the routing probabilities of the chosen experts (DeepSeek's "
        "routed_scaling_factor); unset: 1.", above=0.0, **_MOE)
    moe_router_num_groups: Optional[int] = option(
        None, "Expert groups for group-limited (device- or node-limited) routing; with "
        "--moe-router-group-topk.", at_least=1, **_MOE)
    moe_router_group_topk: Optional[int] = option(
        None, "Groups each token may use under group-limited routing; with "
        "--moe-router-num-groups.", at_least=1, **_MOE)
    moe_router_dtype: Optional[str] = option(
        None, "Precision of the routing computation (fp32 or fp64); unset: the model's dtype.",
        choices=ROUTER_DTYPES, **_MOE)
    moe_router_enable_expert_bias: bool = option(
        False, "Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores "
        "for the top-k choice only, moved after each global batch toward balanced load; needs "
        "sigmoid scoring.", **_MOE)
    moe_router_bias_update_rate: Optional[float] = option(
        None, f"Step of the expert-bias update; only with --moe-router-enable-expert-bias. "
        f"Unset: {DEFAULT_BIAS_UPDATE_RATE}.", above=0.0, **_MOE)
    moe_z_loss_coeff: Optional[float] = option(
        None, "Weight of the router z-loss (keeps router logits small); unset: no z-loss.",
        at_least=0.0, **_MOE)
    moe_expert_capacity_factor: Optional[float] = option(
        None, "Tokens an expert takes per step, as a multiple of an even share; the rest are "
        "dropped. Unset: no capacity limit (dropless).", above=0.0, **_MOE)
    moe_pad_expert_input_to_capacity: bool = option(
        False, "Pad every expert's input to its capacity (fixed shapes); needs "
        "--moe-expert-capacity-factor.", **_MOE)
    moe_token_drop_policy: str = option(
        "probs", "Which tokens over capacity are dropped: the lowest routing probabilities "
        "(probs) or the latest in the sequence (position).", choices=TOKEN_DROP_POLICIES, **_MOE)
    moe_layer_freq: Union[int, List[int]] = option(
        1, "Which layers are MoE: an integer N (every N-th layer, from the first), or a list "
        "of 0 (dense) / 1 (MoE) per layer, e.g. [0,1,1,1] or ([0]*1+[1]*3).",
        parse=parse_moe_layer_freq, **_MOE)
    moe_shared_expert_gate: bool = option(
        False, "A learned sigmoid gate on the shared expert's output (Qwen2-MoE); needs "
        "--moe-shared-expert-intermediate-size.", **_MOE)
    qk_layernorm: bool = option(
        False, "Normalize queries and keys per head (--normalization's norm) before attention "
        "(Qwen3, OLMo 2); with --multi-latent-attention, the query and key/value latents "
        "instead.", megatron=True)
    multi_latent_attention: bool = option(
        False, "Multi-Latent Attention (DeepSeek-V2/V3, megatron-core's MLASelfAttention): "
        "keys and values come from one low-rank latent per token, and every query and key head "
        "has a part without and a part with RoPE.")
    q_lora_rank: Optional[int] = option(
        None, "MLA: width of the query's low-rank latent; unset: queries are projected from "
        "the hidden state directly.", at_least=1, **_MLA)
    kv_lora_rank: int = option(32, "MLA: width of the key/value latent.", at_least=1, **_MLA)
    qk_head_dim: int = option(
        128, "MLA: width of each query and key head without RoPE (a head is qk_head_dim + "
        "qk_pos_emb_head_dim wide).", at_least=1, **_MLA)
    qk_pos_emb_head_dim: int = option(
        64, "MLA: width of the RoPE part of each query and key head (the key's is shared by "
        "all heads).", at_least=1, **_MLA)
    v_head_dim: int = option(128, "MLA: width of each value head.", at_least=1, **_MLA)
    rotary_scaling_factor: float = option(
        1.0, "MLA with YaRN RoPE: the context extension factor.", above=0.0, **_MLA)
    mscale: float = option(1.0, "MLA with YaRN RoPE: mscale of the rotary embedding.", **_MLA)
    mscale_all_dim: float = option(
        0.0, "MLA with YaRN RoPE: mscale_all_dim; with a scaling factor above 1 it also scales "
        "the attention softmax.", **_MLA)
    moe_shared_expert_intermediate_size: Optional[int] = option(
        None, "Inner width of a shared expert every token passes through; unset: none.",
        at_least=1, **_MOE)
    moe_token_dispatcher_type: str = option(
        "allgather", "megatron-core's token dispatcher: alltoall (expert-parallel friendly), "
        "allgather, or flex (DeepEP, GPU only).", choices=TOKEN_DISPATCHERS, **_MOE)
    moe_grouped_gemm: bool = option(
        False, "Run the experts as one grouped GEMM instead of one MLP per expert: Transformer "
        "Engine's TEGroupedMLP (the transformer_engine flavour), or with "
        "--moe-use-legacy-grouped-gemm the grouped_gemm package; both on GPUs only. Same math.",
        **_MOE)
    moe_use_legacy_grouped_gemm: bool = option(
        False, "With --moe-grouped-gemm: megatron-core's legacy GroupedMLP (the grouped_gemm "
        "package, GPUs) instead of Transformer Engine's.", **_MOE)
    # Executing the MoE layer: the same model, computed or communicated another way.
    moe_shared_expert_overlap: bool = option(
        False, "Compute the shared expert while the alltoall dispatcher communicates (on a side "
        "stream, after the router instead of before it); needs a shared expert and "
        "--moe-token-dispatcher-type alltoall. Same model; gradients are summed in another "
        "order.", **_MOE)
    moe_layer_recompute: bool = option(
        False, "Recompute each MoE layer in the backward pass instead of keeping its "
        "activations (megatron-core turns on selective recompute of 'moe', and of the attention "
        "core, its default module); not with --recompute-granularity full.", **_MOE)
    moe_permute_fusion: bool = option(
        False, "Fused token permutation in the dispatcher (Transformer Engine >= 2.1 kernels, "
        "GPUs).", **_MOE)
    moe_router_fusion: bool = option(
        False, "Fused top-k routing and aux-loss computation (Transformer Engine >= 2.7 "
        "kernels, GPUs).", **_MOE)
    moe_flex_dispatcher_backend: str = option(
        "deepep", "Backend of --moe-token-dispatcher-type flex: deepep or hybridep (both from "
        "the deep_ep package, GPUs).", choices=FLEX_BACKENDS, **_MOE)
    moe_enable_deepep: bool = option(
        False, "Megatron-LM's older spelling of --moe-token-dispatcher-type flex with the "
        "deepep backend (needs flex).", **_MOE)
    moe_deepep_num_sms: int = option(
        20, "GPU multiprocessors DeepEP communicates with (flex dispatcher, deepep backend).",
        at_least=1, **_MOE)
    moe_hybridep_num_sms: int = option(
        16, "GPU multiprocessors HybridEP communicates with (flex dispatcher, hybridep "
        "backend).", at_least=1, **_MOE)
    moe_router_padding_for_quantization: bool = option(
        False, "Pad each expert's routed tokens to the multiple FP8 GEMMs need in the router "
        "(no padding in the experts); needs --fp8-format and the alltoall or flex dispatcher.",
        **_MOE)
    moe_router_padding_for_fp8: bool = option(
        False, "Megatron-LM's older spelling of --moe-router-padding-for-quantization.", **_MOE)
    # Changing what the MoE layer computes.
    moe_input_jitter_eps: Optional[float] = option(
        None, "Multiply the router's input by noise drawn uniformly from [1-eps, 1+eps] in every "
        "forward pass (Switch Transformer; megatron-core jitters in evaluation too); unset: "
        "none.", above=0.0, **_MOE)
    moe_router_force_load_balancing: bool = option(
        False, "[Benchmarks] Route by random logits (a fresh normal draw per token) instead of "
        "the router's, so that experts get balanced load whatever the weights; the router still "
        "gets a straight-through gradient.", **_MOE)
    moe_apply_probs_on_input: bool = option(
        False, "Multiply each token by its routing probability before the expert instead of "
        "the expert's output after it; needs --moe-router-topk 1.", **_MOE)
    moe_latent_size: Optional[int] = option(
        None, "Project tokens down to this width before dispatch and back up after the "
        "combine (the experts work in it; two extra linears per MoE layer, Transformer Engine "
        "only); unset: no projection.", at_least=1, **_MOE)
    moe_enable_routing_replay: bool = option(
        False, "Give every router megatron-core's RouterReplay, which records and replays "
        "top-k choices when code drives it (RL frameworks do; spannorm-train never sets an "
        "action, as Megatron-LM's pretrain does not).", **_MOE)
    transformer_impl: str = option(
        "transformer_engine", "Module flavour: transformer_engine (fused norms, FP8; needs "
        "Transformer Engine and a GPU), local (PyTorch modules, runs anywhere, CPU included) or "
        "auto (ours: Transformer Engine when it imports and a GPU is present, else local).",
        choices=TRANSFORMER_IMPLS)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def recommended(cls, **fields) -> "ModelConfig":
        """This project's recipe (`MODERN_RECIPE`), with `fields` on top."""
        return cls(**{**MODERN_RECIPE, **fields})

    # ------------------------------------------------------------------ derived values
    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def resolved_ffn_hidden_size(self) -> int:
        """Megatron-LM's rule: SwiGLU's two input projections get 2/3 of 4h, kept a multiple
        of 64, so the MLP holds about as many parameters as a 4h GeLU MLP."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.swiglu:
            return int((4 * self.hidden_size * 2 / 3) / 64) * 64
        return 4 * self.hidden_size

    @property
    def resolved_moe_ffn_hidden_size(self) -> int:
        """Each expert's inner width: --moe-ffn-hidden-size, or the dense MLP's."""
        return self.moe_ffn_hidden_size or self.resolved_ffn_hidden_size

    @property
    def placement(self) -> Placement:
        """The registry's entry of `norm_placement`: its layer, norms and defaults."""
        return get_placement(self.norm_placement)

    @property
    def resolved_num_query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def resolved_kv_channels(self) -> int:
        """The head width: --kv-channels, or Megatron-LM's hidden_size // num_attention_heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def resolved_rope_type(self) -> str:
        """megatron-core's default: yarn for multi-latent attention (MLATransformerConfig), and
        rope, the only kind, for the other attention."""
        if self.rope_type is not None:
            return self.rope_type
        return "yarn" if self.multi_latent_attention else "rope"

    @property
    def resolved_moe_router_bias_update_rate(self) -> float:
        rate = self.moe_router_bias_update_rate
        return DEFAULT_BIAS_UPDATE_RATE if rate is None else rate

    @property
    def moe_layer_pattern(self) -> List[int]:
        """One entry per layer of the whole model: 1 MoE, 0 dense (all 0 for a dense model)."""
        if not self.is_moe:
            return [0] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return [1 if i % freq == 0 else 0 for i in range(self.num_layers)]
        return list(freq)

    def is_moe_layer(self, layer_number: int) -> bool:
        """Whether global layer `layer_number` (1-based, as megatron-core counts) is MoE."""
        return bool(self.moe_layer_pattern[layer_number - 1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = [f.name for f in fields(cls)]
        for name in sorted(set(values) - set(known)):
            nearest = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"Unknown ModelConfig field {name!r}" + (
                f": did you mean {nearest[0]!r}?" if nearest else f"; the fields are {known}."))
        return cls(**values)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError for a value that cannot work. Pure: touches no device or process group."""
        placement = self.placement
        check(self)
        why = UNSUPPORTED_POSITION_EMBEDDINGS.get(self.position_embedding_type)
        if why:
            raise ConfigError(
                f"--position-embedding-type {self.position_embedding_type} is Megatron-LM's, but "
                f"not available here: {why}. Use learned_absolute, rope or none.")
        if self.transformer_impl == "inference_optimized":
            raise ConfigError(
                "--transformer-impl inference_optimized is Megatron-LM's inference-only spec "
                "and cannot train: use transformer_engine, local or auto.")
        if self.resolved_ffn_hidden_size < 1:
            raise ConfigError(
                f"--swiglu without --ffn-hidden-size gives int(8 x {self.hidden_size} / 3 / 64) x "
                f"64 = 0 inner width (Megatron-LM's rule needs --hidden-size >= 24): give "
                f"--ffn-hidden-size.")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: pick a hidden_size that is a multiple of the head "
                f"count, or give the head width with --kv-channels."
            )
        self._validate_attention()
        groups = self.resolved_num_query_groups
        if self.num_attention_heads % groups:
            divisors = [d for d in range(1, self.num_attention_heads + 1)
                        if self.num_attention_heads % d == 0]
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={groups}: set num_query_groups to one of {divisors}."
            )
        try:
            self.scale_init = parse_scale_init(self.scale_init)
        except ValueError as error:
            raise ConfigError(f"scale_init={error}.") from None
        if self.scale_mode == "forward" and not placement.supports_forward_scaling:
            raise ConfigError(
                f"scale_mode='forward' is not available for norm_placement='{placement.name}' "
                f"(it uses megatron-core's own layer); use scale_mode='init' or one of the "
                f"placements {sorted(_forward_scaling_placements())}."
            )
        if self.is_moe:
            if self.moe_router_topk > self.num_experts:
                raise ConfigError(
                    f"moe_router_topk={self.moe_router_topk} is larger than num_experts="
                    f"{self.num_experts}: each token can go to at most num_experts experts; "
                    f"lower moe_router_topk or add experts."
                )
            if self.add_bias_linear and self.moe_shared_expert_intermediate_size:
                raise ConfigError(
                    "add_bias_linear=True with a shared expert (moe_shared_expert_intermediate_"
                    "size) is not supported by megatron-core's SharedExpertMLP: drop one of them."
                )
        check_moe(self)

    def _validate_attention(self) -> None:
        """Megatron-LM's rules for the head width, RoPE and multi-latent attention."""
        if self.rotary_percent > 1.0:
            raise ConfigError(
                f"--rotary-percent {self.rotary_percent} is above 1: it is the fraction of each "
                f"head's dimensions that RoPE rotates, at most all of them (1.0).")
        if self.rope_type == "yarn" and not self.multi_latent_attention:
            raise ConfigError(
                "--rope-type yarn is implemented by megatron-core's multi-latent attention only "
                "(Megatron-LM: 'Common attention only support rope_type=\"rope\"'): add "
                "--multi-latent-attention, or use --rope-type rope.")
        if self.multi_latent_attention and self.num_query_groups is not None:
            raise ConfigError(
                "--multi-latent-attention and --group-query-attention / --num-query-groups "
                "exclude each other (keys and values come from one shared latent): drop the "
                "query groups.")

    @property
    def balancing_types(self) -> List[str]:
        types = self.moe_router_load_balancing_type
        return list(types) if isinstance(types, (list, tuple)) else [types]


def _forward_scaling_placements() -> list:
    return [name for name, p in PLACEMENTS.items() if p.supports_forward_scaling]
