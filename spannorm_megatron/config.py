"""The model configuration users write: one dataclass, validated before any process group exists.

`ModelConfig` says *what* model to build (placement, shapes, MoE, init); how it is laid out on
devices is the parallel runtime's business. `spannorm_megatron.model.builder` turns it into a
megatron-core `TransformerConfig` and `GPTModel`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

from spannorm_megatron.errors import ConfigError

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
SCALE_INIT_NAMES = ("sqrt_depth", "megatron", "none")
SCALE_MODES = ("init", "forward")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


@dataclass
class ModelConfig:
    """A GPT-style decoder whose layers use one normalization placement.

    Defaults describe a small Llama-like SpanNorm model (RMSNorm, RoPE, SwiGLU, no biases).
    """

    norm_placement: str = "spannorm"
    """Placement name from `spannorm_megatron.model.placements.PLACEMENTS`
    (see shared/design/norm-placements.md for the equations)."""

    num_layers: int = 4
    """Transformer layers in the whole model, all pipeline stages together (the L of Scale Init)."""

    hidden_size: int = 256
    """Width of the residual stream."""

    num_attention_heads: int = 4
    """Query heads."""

    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means one per query head (MHA)."""

    ffn_hidden_size: Optional[int] = None
    """Dense MLP inner width; None means 4 * hidden_size."""

    normalization: str = "RMSNorm"
    """Norm type of every norm in the model: RMSNorm or LayerNorm."""

    norm_epsilon: float = 1e-5
    """Epsilon added to the variance inside every norm."""

    apply_layernorm_1p: bool = False
    """Store norm gains as (gain - 1), initialized at zero, so weight decay pulls them to 1."""

    swiglu: bool = True
    """Gated SiLU MLP (SwiGLU) instead of a plain GeLU MLP."""

    add_bias_linear: bool = False
    """Biases in the attention and MLP linear layers."""

    position_embedding_type: str = "rope"
    """rope, learned_absolute or none."""

    rotary_base: int = 10000
    """RoPE base frequency."""

    max_sequence_length: int = 1024
    """Longest sequence the position embeddings support."""

    vocab_size: int = 32000
    """Vocabulary size as the model sees it (already padded, if padding is wanted)."""

    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output layer weights (Llama style)."""

    init_method_std: float = 0.02
    """Base init std sigma of every weight matrix; output projections may be scaled, see scale_init."""

    hidden_dropout: float = 0.0
    """Dropout on each residual branch output."""

    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    scale_init: Union[str, float, None] = None
    """Output-projection scaling (attention output projection and MLP fc2, every expert's too):
    `sqrt_depth` sigma/sqrt(L), `megatron` sigma/sqrt(2L), `none` sigma, or a positive number c for
    c * sigma. None takes the placement's default (`sqrt_depth` for spannorm, `megatron` else)."""

    scale_mode: str = "init"
    """`init` applies scale_init to the initial weights; `forward` keeps them at sigma and multiplies
    both branch outputs by the same factor in every forward pass instead."""

    first_layer_input_norm: bool = True
    """SpanNorm: normalize the embedding before the first layer's attention (N0)."""

    final_norm: Optional[bool] = None
    """Norm before the output layer; None takes the placement's rule from the contract."""

    num_experts: Optional[int] = None
    """MoE experts per layer; None builds dense MLPs."""

    moe_router_topk: int = 2
    """Experts each token is routed to."""

    moe_ffn_hidden_size: Optional[int] = None
    """Inner width of each expert; None means ffn_hidden_size."""

    moe_aux_loss_coeff: float = 1e-2
    """Weight of the router's load-balancing auxiliary loss."""

    moe_router_load_balancing_type: str = "aux_loss"
    """megatron-core load-balancing type: aux_loss, seq_aux_loss, sinkhorn or none."""

    moe_shared_expert_intermediate_size: Optional[int] = None
    """Inner width of a shared expert every token passes through; None means no shared expert."""

    moe_token_dispatcher_type: str = "alltoall"
    """megatron-core token dispatcher: alltoall (expert parallel friendly) or allgather."""

    moe_grouped_gemm: bool = False
    """Run the experts as one grouped GEMM (Transformer Engine) instead of one MLP per expert."""

    transformer_impl: str = "auto"
    """Module flavour: `local` (PyTorch modules, runs anywhere), `transformer_engine` (fused norms,
    FP8) or `auto` (Transformer Engine when it imports and a GPU is present)."""

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"Unknown ModelConfig field(s) {unknown}: the known fields are {sorted(known)}."
            )
        return cls(**values)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError for a value that cannot work. Pure: touches no device or process group."""
        # Imported here: the registry imports megatron-core, the config itself should not need it.
        from spannorm_megatron.model.placements import get_placement

        placement = get_placement(self.norm_placement)

        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                     "max_sequence_length"):
            _require_positive_int(self, name)
        for name in ("num_query_groups", "ffn_hidden_size", "moe_ffn_hidden_size",
                     "moe_shared_expert_intermediate_size"):
            if getattr(self, name) is not None:
                _require_positive_int(self, name)

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
        _require_choice(self, "normalization", NORMALIZATIONS)
        _require_choice(self, "position_embedding_type", POSITION_EMBEDDINGS)
        _require_choice(self, "scale_mode", SCALE_MODES)
        _require_choice(self, "transformer_impl", TRANSFORMER_IMPLS)
        if not self.norm_epsilon > 0:
            raise ConfigError(f"norm_epsilon={self.norm_epsilon} must be > 0 (e.g. 1e-5).")
        if not self.init_method_std > 0:
            raise ConfigError(f"init_method_std={self.init_method_std} must be > 0 (e.g. 0.02).")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1).")

        self._validate_scale_init()
        if self.scale_mode == "forward" and not placement.supports_forward_scaling:
            raise ConfigError(
                f"scale_mode='forward' is not available for norm_placement='{placement.name}' "
                f"(it uses megatron-core's own layer); use scale_mode='init' or one of the "
                f"placements {sorted(_forward_scaling_placements())}."
            )

        if self.is_moe:
            _require_positive_int(self, "num_experts")
            _require_positive_int(self, "moe_router_topk")
            if self.moe_router_topk > self.num_experts:
                raise ConfigError(
                    f"moe_router_topk={self.moe_router_topk} is larger than num_experts="
                    f"{self.num_experts}: each token can go to at most num_experts experts; "
                    f"lower moe_router_topk or add experts."
                )
            if self.moe_aux_loss_coeff < 0:
                raise ConfigError(f"moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0.")
            _require_choice(self, "moe_token_dispatcher_type", ("alltoall", "allgather"))
            if self.add_bias_linear and self.moe_shared_expert_intermediate_size:
                raise ConfigError(
                    "add_bias_linear=True with a shared expert (moe_shared_expert_intermediate_"
                    "size) is not supported by megatron-core's SharedExpertMLP: drop one of them."
                )
            _require_choice(self, "moe_router_load_balancing_type",
                            ("aux_loss", "seq_aux_loss", "sinkhorn", "none"))

    def _validate_scale_init(self) -> None:
        value = self.scale_init
        if value is None or (isinstance(value, str) and value in SCALE_INIT_NAMES):
            return
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(
                    f"scale_init={self.scale_init!r} is not understood: use one of "
                    f"{list(SCALE_INIT_NAMES)} or a positive number."
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise ConfigError(
                f"scale_init={self.scale_init!r} must be positive: use one of "
                f"{list(SCALE_INIT_NAMES)} or a number c > 0 (output projections get std c * sigma)."
            )
        self.scale_init = float(value)


def _forward_scaling_placements() -> list:
    from spannorm_megatron.model.placements import PLACEMENTS

    return [name for name, p in PLACEMENTS.items() if p.supports_forward_scaling]


def _require_positive_int(config: ModelConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")


def _require_choice(config: ModelConfig, name: str, choices: tuple) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}.")


@dataclass
class ParallelConfig:
    """How the model is laid out over ranks (Megatron-LM's parallel flags)."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every weight matrix (attention heads, MLP width, vocabulary)."""

    pipeline_model_parallel_size: int = 1
    """Pipeline stages; each holds num_layers / (stages x virtual stages) layers per chunk."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage for the interleaved 1F1B schedule; None: plain 1F1B."""

    expert_model_parallel_size: int = 1
    """Ranks that split the experts of every MoE layer (all-to-all token dispatch)."""

    expert_tensor_parallel_size: Optional[int] = None
    """Ranks that split each expert's weights; None means tensor_model_parallel_size."""

    sequence_parallel: bool = False
    """Shard activations outside attention/MLP along the sequence over the tensor-parallel
    ranks (required for MoE with tensor parallelism)."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state (and the fp32 main weights) over the data-parallel ranks."""

    def runtime_kwargs(self) -> dict:
        """Arguments of `spannorm_megatron.runtime.initialize`."""
        return dict(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
        )

    def transformer_kwargs(self) -> dict:
        """The `TransformerConfig` fields these sizes set."""
        return dict(self.runtime_kwargs(), sequence_parallel=self.sequence_parallel)
