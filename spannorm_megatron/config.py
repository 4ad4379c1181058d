"""The model configuration users write: one dataclass, validated before any process group exists.

`ModelConfig` says *what* model to build (placement, shapes, MoE, init); how it is laid out on
devices is the parallel runtime's business. `spannorm_megatron.model.builder` turns it into a
megatron-core `TransformerConfig` and `GPTModel`.
"""

from __future__ import annotations

import ast
import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Union

from spannorm_megatron.errors import ConfigError
from spannorm_megatron.options import check, derived, option
from spannorm_megatron.placements import PLACEMENTS, get_placement, placement_names

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
# Megatron-LM's choices; mrope and relative are refused by `validate` with the reason.
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "mrope", "relative", "none")
UNSUPPORTED_POSITION_EMBEDDINGS = {
    "mrope": "multimodal rotary embeddings need a vision model's position ids, and this stack "
             "trains text-only GPT models",
    "relative": "T5-style relative attention bias needs Transformer Engine's attention bias, "
                "which megatron-core's GPT spec does not wire",
}
# The model this project recommends (Llama-style), as fields. Megatron-LM's defaults, and so
# ours, describe GPT-2 (LayerNorm, learned positions, GeLU, biases, tied embeddings, dropout
# 0.1); example configs and tests spell these out so that one command line builds the same
# model in both stacks (`recipe_flags` gives them as flags).
# `transformer_impl="auto"` runs the same recipe on GPUs (Transformer Engine) and CPUs.
MODERN_RECIPE = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                     add_bias_linear=False, untie_embeddings_and_output_weights=True,
                     hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="auto")
SCALE_INIT_NAMES = ("sqrt_depth", "megatron", "none")
SCALE_MODES = ("init", "forward")
# Megatron-LM's choices (inference_optimized is refused: its specs are for inference only),
# and ours: auto, Transformer Engine where it imports and a GPU is present, local elsewhere.
TRANSFORMER_IMPLS = ("local", "transformer_engine", "inference_optimized", "auto")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
TOKEN_DISPATCHERS = ("alltoall", "allgather", "flex")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
ROUTER_DTYPES = ("fp32", "fp64")
TOKEN_DROP_POLICIES = ("probs", "position")
ROPE_TYPES = ("rope", "yarn")
FLEX_BACKENDS = ("deepep", "hybridep")
PIPELINE_COMM_BACKENDS = ("nccl", "ucc")
DEFAULT_BIAS_UPDATE_RATE = 1e-3  # Megatron-LM's default of --moe-router-bias-update-rate


def recipe_flags(values: dict = MODERN_RECIPE) -> List[str]:
    """`values` (ModelConfig fields) as `spannorm-train` / Megatron-LM flags."""
    from spannorm_megatron.options import flag_of

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


def parse_scale_init(value: Union[str, float, None]) -> Union[str, float, None]:
    """A --scale-init value: one of SCALE_INIT_NAMES, a positive number (c x sigma), or None."""
    if value is None or (isinstance(value, str) and value in SCALE_INIT_NAMES):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not understood: use one of {list(SCALE_INIT_NAMES)} "
                             f"or a positive number") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not (
            math.isfinite(number) and number > 0):
        raise ValueError(f"{value!r} must be positive: use one of {list(SCALE_INIT_NAMES)} or a "
                         f"number c > 0 (output projections get std c x sigma)")
    return float(number)


def parse_moe_layer_freq(value: Union[str, int, List[int]]) -> Union[int, List[int]]:
    """A --moe-layer-freq value: an integer N (an MoE layer every N layers, from the first), or a
    list with one 0 (dense) or 1 (MoE) per layer, written as a list (`[0,1,1,1]`) or in
    Megatron-LM's list arithmetic (`([0]*1+[1]*3)`).

    Megatron-LM evaluates the text as Python; here only list literals of 0/1, `*` by an integer
    and `+` are understood, so a config file cannot run code."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a layer frequency")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value!r} must be >= 1 (1: every layer is MoE) or a list of 0/1")
        return value
    if isinstance(value, (list, tuple)):
        return [_pattern_entry(v) for v in value]
    text = str(value).strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"{text!r} is not understood: give an integer N (an MoE layer every N "
                         f"layers) or a list of 0/1 per layer such as [0,1,1,1] or "
                         f"([0]*1+[1]*3)") from None
    result = _evaluate_pattern(tree, text)
    if isinstance(result, int) and result < 1:
        raise ValueError(f"{text!r} must be >= 1 (1: every layer is MoE) or a list of 0/1")
    return result


def _pattern_entry(value) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"{value!r} is not 0 (dense layer) or 1 (MoE layer)")
    return int(value)


def _evaluate_pattern(node, text: str):
    def fail():
        raise ValueError(f"{text!r} is not understood: give an integer N or a list of 0/1 per "
                         f"layer such as [0,1,1,1] or ([0]*1+[1]*3)")

    if isinstance(node, ast.Constant) and isinstance(node.value, int) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.List):
        values = [_evaluate_pattern(e, text) for e in node.elts]
        if any(isinstance(v, list) for v in values):
            fail()
        return [_pattern_entry(v) for v in values]
    if isinstance(node, ast.BinOp):
        left, right = _evaluate_pattern(node.left, text), _evaluate_pattern(node.right, text)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            return left + right
        if isinstance(node.op, ast.Mult):
            if isinstance(left, list) and isinstance(right, int) and right >= 0:
                return left * right
            if isinstance(right, list) and isinstance(left, int) and left >= 0:
                return right * left
    fail()


@dataclass
class ModelConfig:
    """A GPT-style decoder whose layers use one normalization placement.

    Every field is a `spannorm-train` flag (`spannorm_megatron.options`) whose default is
    Megatron-LM's (a GPT-2-like layer: LayerNorm, learned positions, GeLU, biases, tied
    embeddings, dropout 0.1); `MODERN_RECIPE` holds the Llama-like settings this project
    recommends.
    """

    norm_placement: str = option(
        "spannorm", "Norm placement (shared/design/norm-placements.md).",
        choices=placement_names)
    num_layers: int = option(
        4, "Transformer layers in the whole model, all pipeline stages together (the L of "
        "Scale Init).", at_least=1, required=True)
    hidden_size: int = option(256, "Width of the residual stream.", at_least=1, required=True)
    num_attention_heads: int = option(4, "Query heads.", at_least=1, required=True)
    num_query_groups: Optional[int] = option(
        None, "Key/value heads for grouped-query attention (with --group-query-attention); "
        "unset: one per query head.", at_least=1)
    kv_channels: Optional[int] = option(
        None, "Width of every attention head (queries, keys and values), independent of "
        "--hidden-size; unset: --hidden-size / --num-attention-heads. Multi-latent attention "
        "reads --qk-head-dim, --qk-pos-emb-head-dim and --v-head-dim instead.", at_least=1)
    ffn_hidden_size: Optional[int] = option(
        None, "Dense MLP inner width; unset: 4 x hidden size, or with --swiglu "
        "int(8 x hidden / 3 / 64) x 64 (Megatron-LM's rule).", at_least=1)
    normalization: str = option("LayerNorm", "Type of every norm.", choices=NORMALIZATIONS)
    norm_epsilon: float = option(1e-5, "Epsilon added to the variance inside every norm.",
                                 above=0.0)
    apply_layernorm_1p: bool = option(
        False, "Store norm gains as (gain - 1), initialized at zero, so weight decay pulls them "
        "to 1.")
    swiglu: bool = option(False, "Gated SiLU MLP (SwiGLU) instead of a plain GeLU MLP.")
    add_bias_linear: bool = option(
        True, "Biases in the attention and MLP linear layers; --disable-bias-linear drops them.",
        flag="--disable-bias-linear", negative=True)
    position_embedding_type: str = option(
        "learned_absolute", "Position embedding: learned_absolute, rope or none (mrope and "
        "relative are refused).", choices=POSITION_EMBEDDINGS)
    rotary_base: int = option(10000, "RoPE base frequency.", at_least=1)
    rotary_percent: float = option(
        1.0, "Fraction of each attention head's dimensions that RoPE rotates (the first "
        "int(head dim x fraction)); the rest pass unrotated.", above=0.0)
    rope_type: Optional[str] = option(
        None, "RoPE variant: rope, or yarn (YaRN scaling, --rotary-scaling-factor, --mscale, "
        "--mscale-all-dim; multi-latent attention only). Unset: yarn with "
        "--multi-latent-attention, else rope.", choices=ROPE_TYPES)
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
        "see --scale-init.", above=0.0)
    hidden_dropout: float = option(0.1, "Dropout on each residual branch output.",
                                   at_least=0.0, below=1.0)
    attention_dropout: float = option(0.1, "Dropout on attention probabilities.",
                                      at_least=0.0, below=1.0)
    scale_init: Union[str, float, None] = option(
        None, "Output-projection scaling (attention output projection and MLP fc2, every "
        "expert's too): sqrt_depth sigma/sqrt(L), megatron sigma/sqrt(2L), none sigma, or a "
        "positive number c for c x sigma. Unset: the placement's default (sqrt_depth for "
        "spannorm, megatron else).", parse=parse_scale_init)
    scale_mode: str = option(
        "init", "init applies --scale-init to the initial weights; forward keeps them at sigma "
        "and multiplies both branch outputs by the same factor in every forward pass.",
        choices=SCALE_MODES)
    first_layer_input_norm: bool = option(
        True, "SpanNorm: normalize the embedding before the first layer's attention (N0).")
    final_norm: Optional[bool] = option(
        None, "Norm before the output layer; unset: the placement's rule from the contract.")
    num_experts: Optional[int] = option(None, "MoE experts per layer; unset: dense MLPs.",
                                        at_least=1)
    moe_router_topk: int = option(2, "Experts each token is routed to.", at_least=1)
    moe_ffn_hidden_size: Optional[int] = option(
        None, "Inner width of each expert; unset: --ffn-hidden-size.", at_least=1)
    moe_aux_loss_coeff: Union[float, List[float]] = option(
        0.0, "Weight of the router's load-balancing auxiliary loss (1e-2 is a usual start); "
        "one per --moe-router-load-balancing-type when several are given.", at_least=0.0,
        nargs="+", parse=float)
    moe_router_load_balancing_type: Union[str, List[str]] = option(
        "aux_loss", "megatron-core's load balancing: aux_loss (per micro-batch), seq_aux_loss "
        "(per sequence), global_aux_loss (over the global batch), sinkhorn, or none (e.g. with "
        "--moe-router-enable-expert-bias); several combine, each with its --moe-aux-loss-coeff.",
        choices=LOAD_BALANCING_TYPES, nargs="+", parse=str)
    moe_router_score_function: str = option(
        "softmax", "Router score: softmax, or sigmoid (DeepSeek-V3; normalized over the chosen "
        "experts when topk > 1).", choices=SCORE_FUNCTIONS)
    moe_router_pre_softmax: bool = option(
        False, "Softmax over all experts before the top-k choice (needed for topk 1 with "
        "softmax scoring).")
    moe_router_topk_scaling_factor: Optional[float] = option(
        None, "Multiplier on the routing probabilities of the chosen experts (DeepSeek's "
        "routed_scaling_factor); unset: 1.", above=0.0)
    moe_router_num_groups: Optional[int] = option(
        None, "Expert groups for group-limited (device- or node-limited) routing; with "
        "--moe-router-group-topk.", at_least=1)
    moe_router_group_topk: Optional[int] = option(
        None, "Groups each token may use under group-limited routing; with "
        "--moe-router-num-groups.", at_least=1)
    moe_router_dtype: Optional[str] = option(
        None, "Precision of the routing computation (fp32 or fp64); unset: the model's dtype.",
        choices=ROUTER_DTYPES)
    moe_router_enable_expert_bias: bool = option(
        False, "Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores "
        "for the top-k choice only, moved after each global batch toward balanced load; needs "
        "sigmoid scoring.")
    moe_router_bias_update_rate: Optional[float] = option(
        None, f"Step of the expert-bias update; only with --moe-router-enable-expert-bias. "
        f"Unset: {DEFAULT_BIAS_UPDATE_RATE}.", above=0.0)
    moe_z_loss_coeff: Optional[float] = option(
        None, "Weight of the router z-loss (keeps router logits small); unset: no z-loss.",
        at_least=0.0)
    moe_expert_capacity_factor: Optional[float] = option(
        None, "Tokens an expert takes per step, as a multiple of an even share; the rest are "
        "dropped. Unset: no capacity limit (dropless).", above=0.0)
    moe_pad_expert_input_to_capacity: bool = option(
        False, "Pad every expert's input to its capacity (fixed shapes); needs "
        "--moe-expert-capacity-factor.")
    moe_token_drop_policy: str = option(
        "probs", "Which tokens over capacity are dropped: the lowest routing probabilities "
        "(probs) or the latest in the sequence (position).", choices=TOKEN_DROP_POLICIES)
    moe_layer_freq: Union[int, List[int]] = option(
        1, "Which layers are MoE: an integer N (every N-th layer, from the first), or a list "
        "of 0 (dense) / 1 (MoE) per layer, e.g. [0,1,1,1] or ([0]*1+[1]*3).",
        parse=parse_moe_layer_freq)
    moe_shared_expert_gate: bool = option(
        False, "A learned sigmoid gate on the shared expert's output (Qwen2-MoE); needs "
        "--moe-shared-expert-intermediate-size.")
    qk_layernorm: bool = option(
        False, "Normalize queries and keys per head (--normalization's norm) before attention "
        "(Qwen3, OLMo 2); with --multi-latent-attention, the query and key/value latents "
        "instead.")
    multi_latent_attention: bool = option(
        False, "Multi-Latent Attention (DeepSeek-V2/V3, megatron-core's MLASelfAttention): "
        "keys and values come from one low-rank latent per token, and every query and key head "
        "has a part without and a part with RoPE.")
    q_lora_rank: Optional[int] = option(
        None, "MLA: width of the query's low-rank latent; unset: queries are projected from "
        "the hidden state directly.", at_least=1)
    kv_lora_rank: int = option(32, "MLA: width of the key/value latent.", at_least=1)
    qk_head_dim: int = option(
        128, "MLA: width of each query and key head without RoPE (a head is qk_head_dim + "
        "qk_pos_emb_head_dim wide).", at_least=1)
    qk_pos_emb_head_dim: int = option(
        64, "MLA: width of the RoPE part of each query and key head (the key's is shared by "
        "all heads).", at_least=1)
    v_head_dim: int = option(128, "MLA: width of each value head.", at_least=1)
    rotary_scaling_factor: float = option(
        1.0, "MLA with YaRN RoPE: the context extension factor.", above=0.0)
    mscale: float = option(1.0, "MLA with YaRN RoPE: mscale of the rotary embedding.")
    mscale_all_dim: float = option(
        0.0, "MLA with YaRN RoPE: mscale_all_dim; with a scaling factor above 1 it also scales "
        "the attention softmax.")
    moe_shared_expert_intermediate_size: Optional[int] = option(
        None, "Inner width of a shared expert every token passes through; unset: none.",
        at_least=1)
    moe_token_dispatcher_type: str = option(
        "allgather", "megatron-core's token dispatcher: alltoall (expert-parallel friendly), "
        "allgather, or flex (DeepEP, GPU only).", choices=TOKEN_DISPATCHERS)
    moe_grouped_gemm: bool = option(
        False, "Run the experts as one grouped GEMM instead of one MLP per expert: Transformer "
        "Engine's TEGroupedMLP (the transformer_engine flavour), or with "
        "--moe-use-legacy-grouped-gemm the grouped_gemm package; both on GPUs only. Same math.")
    moe_use_legacy_grouped_gemm: bool = option(
        False, "With --moe-grouped-gemm: megatron-core's legacy GroupedMLP (the grouped_gemm "
        "package, GPUs) instead of Transformer Engine's.")
    # Executing the MoE layer: the same model, computed or communicated another way.
    moe_shared_expert_overlap: bool = option(
        False, "Compute the shared expert while the alltoall dispatcher communicates (on a side "
        "stream, after the router instead of before it); needs a shared expert and "
        "--moe-token-dispatcher-type alltoall. Same model; gradients are summed in another "
        "order.")
    moe_layer_recompute: bool = option(
        False, "Recompute each MoE layer in the backward pass instead of keeping its "
        "activations (megatron-core turns on selective recompute of 'moe', and of the attention "
        "core, its default module); not with --recompute-granularity full.")
    moe_permute_fusion: bool = option(
        False, "Fused token permutation in the dispatcher (Transformer Engine >= 2.1 kernels, "
        "GPUs).")
    moe_router_fusion: bool = option(
        False, "Fused top-k routing and aux-loss computation (Transformer Engine >= 2.7 "
        "kernels, GPUs).")
    moe_flex_dispatcher_backend: str = option(
        "deepep", "Backend of --moe-token-dispatcher-type flex: deepep or hybridep (both from "
        "the deep_ep package, GPUs).", choices=FLEX_BACKENDS)
    moe_enable_deepep: bool = option(
        False, "Megatron-LM's older spelling of --moe-token-dispatcher-type flex with the "
        "deepep backend (needs flex).")
    moe_deepep_num_sms: int = option(
        20, "GPU multiprocessors DeepEP communicates with (flex dispatcher, deepep backend).",
        at_least=1)
    moe_hybridep_num_sms: int = option(
        16, "GPU multiprocessors HybridEP communicates with (flex dispatcher, hybridep "
        "backend).", at_least=1)
    moe_router_padding_for_quantization: bool = option(
        False, "Pad each expert's routed tokens to the multiple FP8 GEMMs need in the router "
        "(no padding in the experts); needs --fp8-format and the alltoall or flex dispatcher.")
    moe_router_padding_for_fp8: bool = option(
        False, "Megatron-LM's older spelling of --moe-router-padding-for-quantization.")
    # Changing what the MoE layer computes.
    moe_input_jitter_eps: Optional[float] = option(
        None, "Multiply the router's input by noise drawn uniformly from [1-eps, 1+eps] in every "
        "forward pass (Switch Transformer; megatron-core jitters in evaluation too); unset: "
        "none.", above=0.0)
    moe_router_force_load_balancing: bool = option(
        False, "[Benchmarks] Route by random logits (a fresh normal draw per token) instead of "
        "the router's, so that experts get balanced load whatever the weights; the router still "
        "gets a straight-through gradient.")
    moe_apply_probs_on_input: bool = option(
        False, "Multiply each token by its routing probability before the expert instead of "
        "the expert's output after it; needs --moe-router-topk 1.")
    moe_latent_size: Optional[int] = option(
        None, "Project tokens down to this width before dispatch and back up after the "
        "combine (the experts work in it; two extra linears per MoE layer, Transformer Engine "
        "only); unset: no projection.", at_least=1)
    moe_enable_routing_replay: bool = option(
        False, "Give every router megatron-core's RouterReplay, which records and replays "
        "top-k choices when code drives it (RL frameworks do; spannorm-train never sets an "
        "action, as Megatron-LM's pretrain does not).")
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
    def resolved_bias_update_rate(self) -> float:
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
        placement = get_placement(self.norm_placement)
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
        self._validate_moe_options()

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

    def _validate_moe_options(self) -> None:
        """Cross-field rules of the MoE flags, each named as Megatron-LM spells it; megatron-core
        would assert most of them only inside TransformerConfig or the router."""
        # As Megatron-LM's validate_args: a one-element list is its value.
        for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, value[0] if len(value) == 1 else list(value))
        types, coeffs = self.moe_router_load_balancing_type, self.moe_aux_loss_coeff
        if isinstance(types, list) and not (isinstance(coeffs, list) and len(coeffs) == len(types)):
            raise ConfigError(
                f"--moe-router-load-balancing-type lists {len(types)} types ({' '.join(types)}): "
                f"give --moe-aux-loss-coeff one coefficient for each, in the same order.")
        if isinstance(coeffs, list) and not isinstance(types, list):
            raise ConfigError(
                f"--moe-aux-loss-coeff lists {len(coeffs)} coefficients but "
                f"--moe-router-load-balancing-type names one type: list as many types.")
        try:
            self.moe_layer_freq = parse_moe_layer_freq(self.moe_layer_freq)
        except ValueError as error:
            raise ConfigError(f"--moe-layer-freq (moe_layer_freq) = {error}.") from None
        freq = self.moe_layer_freq
        if isinstance(freq, list) and len(freq) != self.num_layers:
            raise ConfigError(
                f"--moe-layer-freq lists {len(freq)} layers but --num-layers is "
                f"{self.num_layers}: give one 0 (dense) or 1 (MoE) per layer, e.g. "
                f"([0]*1+[1]*{self.num_layers - 1}).")
        if not self.is_moe:
            if freq != 1:
                raise ConfigError("--moe-layer-freq applies to MoE models, and this model is "
                                  "dense: set --num-experts or drop --moe-layer-freq.")
            given = self._moe_execution_flags_given()
            if given:
                raise ConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} "
                                  f"to MoE models, and this model is dense: set --num-experts "
                                  f"or drop {'it' if len(given) == 1 else 'them'}.")
            return
        if 1 not in self.moe_layer_pattern:
            raise ConfigError(
                f"--moe-layer-freq {freq} makes no layer MoE although --num-experts is set: "
                f"mark at least one layer 1, or drop --num-experts for a dense model.")
        sigmoid = self.moe_router_score_function == "sigmoid"
        if sigmoid and self.moe_router_pre_softmax:
            raise ConfigError(
                "--moe-router-pre-softmax applies to softmax scoring, and "
                "--moe-router-score-function is sigmoid: drop one of them.")
        if (self.moe_router_topk == 1 and not sigmoid and not self.moe_router_pre_softmax
                and "sinkhorn" not in self.balancing_types):
            raise ConfigError(
                "--moe-router-topk 1 with softmax scoring needs --moe-router-pre-softmax (a "
                "softmax over one chosen expert is constant, so the router would get no "
                "gradient).")
        if self.moe_router_enable_expert_bias and not sigmoid:
            raise ConfigError(
                "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                "(megatron-core's aux-loss-free balancing is defined for sigmoid scores).")
        if self.moe_router_bias_update_rate is not None and not self.moe_router_enable_expert_bias:
            raise ConfigError(
                "--moe-router-bias-update-rate is set but there is no expert bias to update: add "
                "--moe-router-enable-expert-bias, or drop the rate.")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ConfigError(
                "Group-limited routing needs both --moe-router-num-groups and "
                "--moe-router-group-topk: set both, or neither.")
        if groups is not None:
            if self.num_experts % groups:
                raise ConfigError(
                    f"--num-experts {self.num_experts} is not divisible by "
                    f"--moe-router-num-groups {groups}: each group needs the same number of "
                    f"experts; use a group count that divides the experts.")
            if group_topk > groups:
                raise ConfigError(
                    f"--moe-router-group-topk {group_topk} is larger than "
                    f"--moe-router-num-groups {groups}: a token cannot use more groups than "
                    f"exist; lower --moe-router-group-topk.")
            if self.moe_router_topk % group_topk:
                raise ConfigError(
                    f"--moe-router-topk {self.moe_router_topk} is not divisible by "
                    f"--moe-router-group-topk {group_topk}: megatron-core picks topk / group_topk "
                    f"experts in each chosen group.")
            if self.moe_router_topk // group_topk > self.num_experts // groups:
                raise ConfigError(
                    f"--moe-router-topk {self.moe_router_topk} / --moe-router-group-topk "
                    f"{group_topk} experts per group exceeds the {self.num_experts // groups} "
                    f"experts of a group: raise --moe-router-group-topk or lower "
                    f"--moe-router-num-groups.")
        if self.moe_expert_capacity_factor is not None and \
                "sinkhorn" in self.balancing_types:
            raise ConfigError(
                "--moe-expert-capacity-factor works with aux_loss, seq_aux_loss, "
                "global_aux_loss or none balancing, not sinkhorn: change "
                "--moe-router-load-balancing-type or drop the capacity factor.")
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            raise ConfigError(
                "--moe-pad-expert-input-to-capacity needs a capacity to pad to: add "
                "--moe-expert-capacity-factor X.")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ConfigError(
                "--moe-shared-expert-gate gates a shared expert, and there is none: add "
                "--moe-shared-expert-intermediate-size N.")
        # Whether this machine has DeepEP for flex is asked by model.moe_kernels (before any
        # process group, in the Trainer), so that a GPU run's config can be read anywhere.
        self._validate_moe_execution()

    def _moe_execution_flags_given(self) -> List[str]:
        """The MoE-only flags of this model that differ from their defaults (Megatron-LM
        ignores them on a dense model; here they are named)."""
        defaults = {f.name: f.default for f in fields(ModelConfig)}
        names = ("moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_shared_expert_overlap",
                 "moe_layer_recompute", "moe_permute_fusion", "moe_router_fusion",
                 "moe_flex_dispatcher_backend", "moe_enable_deepep", "moe_deepep_num_sms",
                 "moe_hybridep_num_sms", "moe_router_padding_for_quantization",
                 "moe_router_padding_for_fp8", "moe_input_jitter_eps",
                 "moe_router_force_load_balancing", "moe_apply_probs_on_input",
                 "moe_latent_size", "moe_enable_routing_replay")
        return ["--" + name.replace("_", "-") for name in names
                if getattr(self, name) != defaults[name]]

    def _validate_moe_execution(self) -> None:
        """What megatron-core would assert (or silently ignore) about the MoE execution flags,
        said before anything starts. Whether this machine has the kernels they need is
        `spannorm_megatron.model.moe_kernels`'s question."""
        flex = self.moe_token_dispatcher_type == "flex"
        backend = "deepep" if self.moe_enable_deepep else self.moe_flex_dispatcher_backend
        rules = [
            (self.moe_use_legacy_grouped_gemm and not self.moe_grouped_gemm,
             "--moe-use-legacy-grouped-gemm chooses the grouped GEMM's implementation: add "
             "--moe-grouped-gemm, or drop it"),
            (self.moe_shared_expert_overlap and self.moe_shared_expert_intermediate_size is None,
             "--moe-shared-expert-overlap overlaps a shared expert, and there is none: add "
             "--moe-shared-expert-intermediate-size N, or drop it"),
            (self.moe_shared_expert_overlap and self.moe_token_dispatcher_type != "alltoall",
             f"--moe-shared-expert-overlap overlaps the shared expert with the alltoall "
             f"dispatcher's communication (megatron-core), and --moe-token-dispatcher-type is "
             f"{self.moe_token_dispatcher_type}: use alltoall, or drop it"),
            (self.moe_shared_expert_overlap and self.moe_latent_size is not None,
             "--moe-shared-expert-overlap does not work with --moe-latent-size (megatron-core): "
             "drop one of them"),
            (self.moe_enable_deepep and not flex,
             "--moe-enable-deepep is the flex dispatcher's DeepEP backend: add "
             "--moe-token-dispatcher-type flex, or drop it"),
            (self.moe_enable_deepep and self.moe_flex_dispatcher_backend == "hybridep",
             "--moe-enable-deepep asks for the deepep backend and --moe-flex-dispatcher-backend "
             "for hybridep: give one of them"),
            (self.moe_flex_dispatcher_backend != "deepep" and not flex,
             f"--moe-flex-dispatcher-backend {self.moe_flex_dispatcher_backend} applies to "
             f"--moe-token-dispatcher-type flex: add it, or drop the backend"),
            (self.moe_deepep_num_sms != 20 and not (flex and backend == "deepep"),
             "--moe-deepep-num-sms applies to the flex dispatcher's deepep backend "
             "(--moe-token-dispatcher-type flex): add it, or drop the flag"),
            (self.moe_hybridep_num_sms != 16 and not (flex and backend == "hybridep"),
             "--moe-hybridep-num-sms applies to the flex dispatcher's hybridep backend "
             "(--moe-token-dispatcher-type flex --moe-flex-dispatcher-backend hybridep): add "
             "them, or drop the flag"),
            ((self.moe_router_padding_for_quantization or self.moe_router_padding_for_fp8)
             and self.moe_token_dispatcher_type == "allgather",
             "--moe-router-padding-for-quantization (or -fp8) is not supported by the allgather "
             "dispatcher (megatron-core): use --moe-token-dispatcher-type alltoall or flex"),
            (self.moe_apply_probs_on_input and self.moe_router_topk != 1,
             f"--moe-apply-probs-on-input scales each token by its one routing probability "
             f"before the expert, which megatron-core defines for --moe-router-topk 1 only "
             f"(it is {self.moe_router_topk})"),
            (self.moe_latent_size is not None and self.moe_use_legacy_grouped_gemm,
             "--moe-latent-size does not work with --moe-use-legacy-grouped-gemm (Megatron-LM): "
             "drop one of them"),
        ]
        for broken, message in rules:
            if broken:
                raise ConfigError(message + ".")


def _forward_scaling_placements() -> list:
    return [name for name, p in PLACEMENTS.items() if p.supports_forward_scaling]


@dataclass
class ParallelConfig:
    """How the model is laid out over ranks (Megatron-LM's parallel flags)."""

    tensor_model_parallel_size: int = option(
        1, "Ranks that split every weight matrix (attention heads, MLP width, vocabulary).",
        at_least=1)
    pipeline_model_parallel_size: int = option(
        1, "Pipeline stages; each holds num_layers / (stages x virtual stages) layers per chunk.",
        at_least=1)
    virtual_pipeline_model_parallel_size: Optional[int] = option(
        None, "Model chunks per pipeline stage for the interleaved 1F1B schedule; unset: plain "
        "1F1B.", at_least=1, flag="--num-virtual-stages-per-pipeline-rank",
        aliases=("--virtual-pipeline-model-parallel-size",))
    expert_model_parallel_size: int = option(
        1, "Ranks that split the experts of every MoE layer (all-to-all token dispatch).",
        at_least=1)
    expert_tensor_parallel_size: Optional[int] = option(
        None, "Ranks that split each expert's weights; unset: --tensor-model-parallel-size.",
        at_least=1)
    sequence_parallel: bool = option(
        False, "Shard activations outside attention/MLP along the sequence over the "
        "tensor-parallel ranks (required for MoE with tensor parallelism); off at "
        "--tensor-model-parallel-size 1, as Megatron-LM turns it off there.")
    context_parallel_size: int = option(
        1, "Ranks that split every sequence (Transformer Engine's attention exchanges keys and "
        "values between them); needs the Transformer Engine layers.", at_least=1)
    use_distributed_optimizer: bool = option(
        False, "Shard optimizer state (and the fp32 main weights) over the data-parallel ranks.")
    decoder_first_pipeline_num_layers: Optional[int] = option(
        None, "Transformer layers on the first pipeline stage (uneven stages); the other stages "
        "share the rest evenly. Unset: an even share.", at_least=1)
    decoder_last_pipeline_num_layers: Optional[int] = option(
        None, "Transformer layers on the last pipeline stage (uneven stages); unset: an even "
        "share.", at_least=1)
    account_for_embedding_in_pipeline_split: bool = option(
        False, "Count the embedding as one layer when splitting layers over pipeline stages, so "
        "the first stage holds one transformer layer less.")
    account_for_loss_in_pipeline_split: bool = option(
        False, "Count the output layer and loss as one layer when splitting over pipeline "
        "stages, so the last stage holds one transformer layer less.")
    pipeline_model_parallel_layout: Optional[str] = option(
        None, "Explicit layer placement, megatron-core's syntax: stages separated by |, E the "
        "embedding, t a transformer layer, L the loss, (..)*n repeats; e.g. 'Ettt|(tt|)*2tL' "
        "for 4 stages. More stages than --pipeline-model-parallel-size make virtual stages.")
    overlap_p2p_comm: bool = option(
        True, "Interleaved schedule: overlap the pipeline's sends and receives with compute "
        "(Megatron-LM's default). --no-overlap-p2p-communication batches them instead, which "
        "needs --pipeline-model-parallel-size > 2 with virtual stages. Without virtual stages "
        "there is no overlap either way.", flag="--no-overlap-p2p-communication", negative=True)
    overlap_p2p_comm_warmup_flush: bool = option(
        False, "Interleaved schedule: overlap communication in the warm-up and flush phases too "
        "(needs virtual stages and the p2p overlap).",
        flag="--overlap-p2p-communication-warmup-flush")
    microbatch_group_size_per_vp_stage: Optional[int] = option(
        None, "Interleaved schedule: micro-batches each model chunk runs in a row before the "
        "next chunk's turn, at least --pipeline-model-parallel-size and at most the micro-batches "
        "of a step; unset: --pipeline-model-parallel-size (depth-first).",
        flag="--microbatch-group-size-per-virtual-pipeline-stage", at_least=1)
    use_tp_pp_dp_mapping: bool = option(
        False, "Number the ranks tensor, then pipeline, then data parallel (megatron-core's "
        "order 'tp-cp-ep-pp-dp') instead of data before pipeline, e.g. to keep a pipeline "
        "within a node; expert layouts must then keep the data-parallel size (expert tensor x "
        "expert parallel = tensor parallel size).")
    pipeline_model_parallel_comm_backend: Optional[str] = option(
        None, "Backend of the pipeline's point-to-point groups: nccl or ucc (GPUs; ucc needs "
        "a PyTorch built with UCC); unset: the default backend (nccl on GPUs, gloo on CPU).",
        choices=PIPELINE_COMM_BACKENDS)
    use_ring_exchange_p2p: bool = option(
        False, "Exchange pipeline activations with torch.distributed.ring_exchange (a custom "
        "PyTorch build) instead of batch_isend_irecv.")

    def __post_init__(self) -> None:
        check(self)
        if self.tensor_model_parallel_size == 1:
            # Megatron-LM's validate_args (its scripts pass --sequence-parallel whatever the TP
            # size; megatron-core would refuse it); parse_args says so once.
            self.sequence_parallel = False
        if self.virtual_pipeline_model_parallel_size == 1:
            # As Megatron-LM: one model chunk per stage is the plain 1F1B schedule.
            self.virtual_pipeline_model_parallel_size = None
        self._validate_pipeline_split()
        self._validate_schedule()

    @property
    def uneven_stages(self) -> bool:
        return (self.decoder_first_pipeline_num_layers is not None
                or self.decoder_last_pipeline_num_layers is not None)

    def _validate_pipeline_split(self) -> None:
        """The rules that do not need the model; check_model_fits_layout has the rest."""
        pp = self.pipeline_model_parallel_size
        accounts = (self.account_for_embedding_in_pipeline_split
                    or self.account_for_loss_in_pipeline_split)
        named = [flag for flag, used in (
            ("--decoder-first-pipeline-num-layers", self.decoder_first_pipeline_num_layers),
            ("--decoder-last-pipeline-num-layers", self.decoder_last_pipeline_num_layers),
            ("--account-for-embedding-in-pipeline-split",
             self.account_for_embedding_in_pipeline_split),
            ("--account-for-loss-in-pipeline-split", self.account_for_loss_in_pipeline_split),
        ) if used]
        if self.pipeline_model_parallel_layout is not None:
            if named:
                raise ConfigError(
                    f"--pipeline-model-parallel-layout places every layer itself and cannot be "
                    f"combined with {', '.join(named)}: drop one of them.")
            self.virtual_pipeline_model_parallel_size = _layout_virtual_stages(
                self.pipeline_model_parallel_layout, pp,
                self.virtual_pipeline_model_parallel_size)
            return
        if named and pp == 1:
            raise ConfigError(
                f"{', '.join(named)} split layers over pipeline stages, and "
                f"--pipeline-model-parallel-size is 1: raise it, or drop them.")
        if self.uneven_stages and accounts:
            raise ConfigError(
                "--decoder-first/last-pipeline-num-layers and --account-for-embedding/loss-in-"
                "pipeline-split are two ways of unevening the stages and cannot be combined "
                "(megatron-core): use one of them.")

    @property
    def interleaved(self) -> bool:
        return self.virtual_pipeline_model_parallel_size is not None

    def _validate_schedule(self) -> None:
        """The pipeline schedule's flags, as Megatron-LM and megatron-core check them (the
        micro-batch count is checked by `check_microbatches` once it is known)."""
        pp, etp = self.pipeline_model_parallel_size, self.expert_tensor_parallel_size
        rules = [
            (self.interleaved and not self.overlap_p2p_comm and pp <= 2,
             f"--no-overlap-p2p-communication with virtual stages needs "
             f"--pipeline-model-parallel-size > 2 (it is {pp}): with two stages the batched "
             f"sends and receives go to one peer in one batch (Megatron-LM refuses it). Drop "
             f"the flag, or use more stages"),
            (self.overlap_p2p_comm_warmup_flush and not self.interleaved,
             "--overlap-p2p-communication-warmup-flush applies to the interleaved schedule: "
             "give --num-virtual-stages-per-pipeline-rank N, or drop it"),
            (self.overlap_p2p_comm_warmup_flush and not self.overlap_p2p_comm,
             "--overlap-p2p-communication-warmup-flush extends the p2p overlap, which "
             "--no-overlap-p2p-communication turns off: drop one of them"),
            (self.microbatch_group_size_per_vp_stage is not None and not self.interleaved,
             "--microbatch-group-size-per-virtual-pipeline-stage applies to the interleaved "
             "schedule: give --num-virtual-stages-per-pipeline-rank N, or drop it"),
            (self.interleaved and (self.microbatch_group_size_per_vp_stage or pp) < pp,
             f"--microbatch-group-size-per-virtual-pipeline-stage "
             f"{self.microbatch_group_size_per_vp_stage} is below --pipeline-model-parallel-"
             f"size {pp}: a group must fill the pipeline (megatron-core)"),
            (self.use_tp_pp_dp_mapping and pp > 1 and (etp or self.tensor_model_parallel_size)
             * self.expert_model_parallel_size != self.tensor_model_parallel_size,
             f"--use-tp-pp-dp-mapping with pipeline stages needs the expert layers' data-parallel "
             f"size to equal the dense layers' (megatron-core): --expert-tensor-parallel-size x "
             f"--expert-model-parallel-size = {(etp or self.tensor_model_parallel_size)} x "
             f"{self.expert_model_parallel_size} must equal --tensor-model-parallel-size "
             f"{self.tensor_model_parallel_size}; drop the mapping flag or change the sizes"),
        ]
        for broken, message in rules:
            if broken:
                raise ConfigError(message + ".")

    def check_microbatches(self, num_microbatches: int) -> None:
        """The interleaved schedule's rules on the micro-batches of a step (megatron-core raises
        them in the first step): at least one group of them, and a last group that is whole or
        still fills the pipeline."""
        if not self.interleaved:
            return
        pp = self.pipeline_model_parallel_size
        group = self.microbatch_group_size_per_vp_stage or pp
        flag = ("--microbatch-group-size-per-virtual-pipeline-stage"
                if self.microbatch_group_size_per_vp_stage else "--pipeline-model-parallel-size")
        if group > num_microbatches:
            raise ConfigError(
                f"The interleaved schedule runs micro-batches in groups of {group} ({flag}), "
                f"and a step has {num_microbatches} per rank (--global-batch-size / "
                f"(--micro-batch-size x data-parallel size)): raise --global-batch-size, or "
                f"lower {flag}.")
        rest = num_microbatches % group
        if 0 < rest < pp:
            raise ConfigError(
                f"The interleaved schedule's last group of micro-batches would hold {rest} "
                f"({num_microbatches} per step in groups of {group}, {flag}): it must be whole "
                f"or at least --pipeline-model-parallel-size {pp} (megatron-core). Make the "
                f"micro-batches a multiple of {group}, or change the group size.")

    @property
    def rank_order(self) -> str:
        """megatron-core's `initialize_model_parallel(order=...)`, as Megatron-LM picks it."""
        return "tp-cp-ep-pp-dp" if self.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp"

    def transformer_kwargs(self) -> dict:
        """The `TransformerConfig` fields these sizes set."""
        # Megatron-LM overlaps p2p communication only in the interleaved schedule, and batches
        # the sends and receives wherever it does not overlap them.
        overlap = self.overlap_p2p_comm and self.interleaved
        return dict(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
            sequence_parallel=self.sequence_parallel,
            context_parallel_size=self.context_parallel_size,
            num_layers_in_first_pipeline_stage=self.decoder_first_pipeline_num_layers,
            num_layers_in_last_pipeline_stage=self.decoder_last_pipeline_num_layers,
            account_for_embedding_in_pipeline_split=self.account_for_embedding_in_pipeline_split,
            account_for_loss_in_pipeline_split=self.account_for_loss_in_pipeline_split,
            pipeline_model_parallel_layout=self.pipeline_model_parallel_layout,
            overlap_p2p_comm=overlap,
            batch_p2p_comm=not overlap,
            overlap_p2p_comm_warmup_flush=self.overlap_p2p_comm_warmup_flush,
            microbatch_group_size_per_vp_stage=self.microbatch_group_size_per_vp_stage,
            use_ring_exchange_p2p=self.use_ring_exchange_p2p,
            pipeline_model_parallel_comm_backend=self.pipeline_model_parallel_comm_backend,
        )

    def stage_layer_counts(self, num_layers: int) -> List[List[int]]:
        """Transformer layers of each [pipeline rank][virtual stage], as megatron-core's
        get_num_layers_to_build splits them; ConfigError when they cannot add up or leave a
        stage without layers. Pure arithmetic, no process group."""
        pp, vpp = self.pipeline_model_parallel_size, self.virtual_pipeline_model_parallel_size or 1
        if self.pipeline_model_parallel_layout is not None:
            return _layout_counts(self.pipeline_model_parallel_layout, pp, num_layers)
        stages = pp * vpp
        if self.uneven_stages:
            first, last = self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
            given = [n for n in (first, last) if n is not None]
            middle_layers, middle_ranks = num_layers - sum(given), pp - len(given)
            for flag, n in (("--decoder-first-pipeline-num-layers", first),
                            ("--decoder-last-pipeline-num-layers", last)):
                if n is not None and n % vpp:
                    raise ConfigError(
                        f"{flag} {n} is not divisible by --num-virtual-stages-per-pipeline-rank "
                        f"{vpp}: each of the stage's model chunks needs the same number of "
                        f"layers.")
            if middle_ranks == 0 and middle_layers != 0:
                raise ConfigError(
                    f"The uneven stages hold {sum(given)} layers but --num-layers is "
                    f"{num_layers}: with --pipeline-model-parallel-size {pp} the first and last "
                    f"stage must add up to --num-layers.")
            if middle_ranks and (middle_layers <= 0 or middle_layers % (middle_ranks * vpp)):
                raise ConfigError(
                    f"--num-layers {num_layers} minus the uneven stages' {sum(given)} leaves "
                    f"{middle_layers} layers for {middle_ranks} other stage(s)"
                    + (f" x {vpp} virtual stages" if vpp > 1 else "") + ": each needs the "
                    "same number, at least one. Adjust --decoder-first/last-pipeline-num-"
                    "layers.")
            share = middle_layers // middle_ranks if middle_ranks else 0
            per_rank = [share] * pp
            if first is not None:
                per_rank[0] = first
            if last is not None:
                per_rank[-1] = last
            return [[n // vpp] * vpp for n in per_rank]
        extra = int(self.account_for_embedding_in_pipeline_split) + int(
            self.account_for_loss_in_pipeline_split)
        total = num_layers + extra
        if total % stages:
            size = ("pipeline_model_parallel_size" if vpp == 1 else
                    "pipeline_model_parallel_size x virtual_pipeline_model_parallel_size")
            counted = (f" (+{extra} for the embedding/loss counted as layers = {total})"
                       if extra else "")
            raise ConfigError(
                f"num_layers={num_layers}{counted} is not divisible by {size}={stages}: every "
                f"(virtual) pipeline stage must hold the same number of layers; or give "
                f"--decoder-first/last-pipeline-num-layers for uneven stages.")
        counts = [[total // stages] * vpp for _ in range(pp)]
        if self.account_for_embedding_in_pipeline_split:
            counts[0][0] -= 1
        if self.account_for_loss_in_pipeline_split:
            counts[-1][-1] -= 1
        if any(n < 1 for row in counts for n in row):
            raise ConfigError(
                f"--account-for-embedding/loss-in-pipeline-split with --num-layers {num_layers} "
                f"over {stages} (virtual) stages leaves a stage with no transformer layer: use "
                f"fewer stages or more layers.")
        return counts


def _layout_stages(layout: str) -> list:
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    try:
        return PipelineParallelLayerLayout.parse_str_to_list(layout)
    except (AssertionError, ValueError) as error:
        raise ConfigError(f"--pipeline-model-parallel-layout {layout!r} is not understood "
                          f"({error}): use E, t, L, | and (..)*n.") from None


def _layout_virtual_stages(layout: str, pp: int, vpp: Optional[int]) -> Optional[int]:
    stages = len(_layout_stages(layout))
    if stages % pp:
        raise ConfigError(
            f"--pipeline-model-parallel-layout has {stages} stages, not a multiple of "
            f"--pipeline-model-parallel-size {pp}: give pp x (virtual stages) stages.")
    derived_vpp = stages // pp if stages > pp else None
    if vpp is not None and vpp != (derived_vpp or 1):
        raise ConfigError(
            f"--num-virtual-stages-per-pipeline-rank {vpp} disagrees with "
            f"--pipeline-model-parallel-layout ({stages} stages over {pp} ranks): drop it, the "
            f"layout sets it.")
    return derived_vpp


def _layout_counts(layout: str, pp: int, num_layers: int) -> List[List[int]]:
    from megatron.core.transformer.enums import LayerType

    stages = _layout_stages(layout)
    flat = [kind for stage in stages for kind in stage]
    decoders = flat.count(LayerType.decoder)
    problem = None
    if flat[:1] != [LayerType.embedding] or flat.count(LayerType.embedding) != 1:
        problem = "it must start with the embedding E, once"
    elif flat[-1:] != [LayerType.loss] or flat.count(LayerType.loss) != 1:
        problem = "it must end with the loss L, once"
    elif LayerType.mtp in flat:
        problem = "multi-token prediction layers (m) are not supported here"
    elif decoders != num_layers:
        problem = f"it places {decoders} transformer layers (t) and --num-layers is {num_layers}"
    elif any(LayerType.decoder not in stage for stage in stages):
        problem = "a stage holds no transformer layer (t)"
    if problem:
        raise ConfigError(f"--pipeline-model-parallel-layout {layout!r}: {problem}.")
    vpp = len(stages) // pp
    # Stage s of the flat list is virtual stage s // pp of pipeline rank s % pp.
    return [[stages[v * pp + r].count(LayerType.decoder) for v in range(vpp)]
            for r in range(pp)]
