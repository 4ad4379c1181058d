"""The model configuration users write: one dataclass, validated before any process group exists.

`ModelConfig` says *what* model to build (placement, shapes, MoE, init); how it is laid out on
devices is the parallel runtime's business. `spannorm_megatron.model.builder` turns it into a
megatron-core `TransformerConfig` and `GPTModel`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

from spannorm_megatron.errors import ConfigError
from spannorm_megatron.options import check, derived, option
from spannorm_megatron.placements import PLACEMENTS, get_placement, placement_names

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
SCALE_INIT_NAMES = ("sqrt_depth", "megatron", "none")
SCALE_MODES = ("init", "forward")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "sinkhorn", "none")
TOKEN_DISPATCHERS = ("alltoall", "allgather")


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


@dataclass
class ModelConfig:
    """A GPT-style decoder whose layers use one normalization placement.

    Defaults describe a small Llama-like SpanNorm model (RMSNorm, RoPE, SwiGLU, no biases).
    Every field is a `spannorm-train` flag (`spannorm_megatron.options`).
    """

    norm_placement: str = option(
        "spannorm", "Norm placement (shared/design/norm-placements.md).",
        choices=placement_names)
    num_layers: int = option(
        4, "Transformer layers in the whole model, all pipeline stages together (the L of "
        "Scale Init).", at_least=1)
    hidden_size: int = option(256, "Width of the residual stream.", at_least=1)
    num_attention_heads: int = option(4, "Query heads.", at_least=1)
    num_query_groups: Optional[int] = option(
        None, "Key/value heads for grouped-query attention (with --group-query-attention); "
        "unset: one per query head.", at_least=1)
    ffn_hidden_size: Optional[int] = option(
        None, "Dense MLP inner width; unset: 4 x hidden size.", at_least=1)
    normalization: str = option("RMSNorm", "Type of every norm.", choices=NORMALIZATIONS)
    norm_epsilon: float = option(1e-5, "Epsilon added to the variance inside every norm.",
                                 above=0.0)
    apply_layernorm_1p: bool = option(
        False, "Store norm gains as (gain - 1), initialized at zero, so weight decay pulls them "
        "to 1.")
    swiglu: bool = option(True, "Gated SiLU MLP (SwiGLU) instead of a plain GeLU MLP.")
    add_bias_linear: bool = option(
        False, "Biases in the attention and MLP linear layers (off unless given, as with "
        "Megatron-LM's --disable-bias-linear).")
    position_embedding_type: str = option("rope", "Position embedding.",
                                          choices=POSITION_EMBEDDINGS)
    rotary_base: int = option(10000, "RoPE base frequency.", at_least=1)
    max_sequence_length: int = option(
        1024, "Longest sequence the position embeddings support.",
        flag="--max-position-embeddings", at_least=1, fallback="--seq-length")
    vocab_size: int = derived(
        32000, "Vocabulary size as the model sees it (already padded, if padding is wanted).",
        source="the tokenizer, padded by --make-vocab-size-divisible-by", at_least=1)
    untie_embeddings_and_output_weights: bool = option(
        True, "Separate input embedding and output layer weights (Llama style).")
    init_method_std: float = option(
        0.02, "Base init std sigma of every weight matrix; output projections may be scaled, "
        "see --scale-init.", above=0.0)
    hidden_dropout: float = option(0.0, "Dropout on each residual branch output.",
                                   at_least=0.0, below=1.0)
    attention_dropout: float = option(0.0, "Dropout on attention probabilities.",
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
    moe_aux_loss_coeff: float = option(
        1e-2, "Weight of the router's load-balancing auxiliary loss.", at_least=0.0)
    moe_router_load_balancing_type: str = option(
        "aux_loss", "megatron-core's load balancing.", choices=LOAD_BALANCING_TYPES)
    moe_shared_expert_intermediate_size: Optional[int] = option(
        None, "Inner width of a shared expert every token passes through; unset: none.",
        at_least=1)
    moe_token_dispatcher_type: str = option(
        "alltoall", "megatron-core's token dispatcher: alltoall (expert-parallel friendly) or "
        "allgather.", choices=TOKEN_DISPATCHERS)
    moe_grouped_gemm: bool = option(
        False, "Run the experts as one grouped GEMM (Transformer Engine) instead of one MLP "
        "per expert.")
    transformer_impl: str = option(
        "auto", "Module flavour: local (PyTorch modules, runs anywhere), transformer_engine "
        "(fused norms, FP8) or auto (Transformer Engine when it imports and a GPU is present).",
        choices=TRANSFORMER_IMPLS)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def resolved_ffn_hidden_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    @property
    def resolved_num_query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

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
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}: pick a hidden_size that is a multiple of the head count."
            )
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
        "1F1B.", at_least=1)
    expert_model_parallel_size: int = option(
        1, "Ranks that split the experts of every MoE layer (all-to-all token dispatch).",
        at_least=1)
    expert_tensor_parallel_size: Optional[int] = option(
        None, "Ranks that split each expert's weights; unset: --tensor-model-parallel-size.",
        at_least=1)
    sequence_parallel: bool = option(
        False, "Shard activations outside attention/MLP along the sequence over the "
        "tensor-parallel ranks (required for MoE with tensor parallelism).")
    use_distributed_optimizer: bool = option(
        False, "Shard optimizer state (and the fp32 main weights) over the data-parallel ranks.")

    def __post_init__(self) -> None:
        check(self)

    def transformer_kwargs(self) -> dict:
        """The `TransformerConfig` fields these sizes set."""
        return dict(tensor_model_parallel_size=self.tensor_model_parallel_size,
                    pipeline_model_parallel_size=self.pipeline_model_parallel_size,
                    virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
                    expert_model_parallel_size=self.expert_model_parallel_size,
                    expert_tensor_parallel_size=self.expert_tensor_parallel_size,
                    sequence_parallel=self.sequence_parallel)
