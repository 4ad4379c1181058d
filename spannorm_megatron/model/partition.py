"""What must divide what when a model is split over a parallel layout.

megatron-core asserts most of these deep inside module constructors (or hangs in a collective);
checking them up front turns each into one message that names the sizes and the fix.
"""

from __future__ import annotations

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ConfigError, ParallelLayoutError
from spannorm_megatron.model.specs import transformer_engine_available


def check_model_fits_layout(config: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise ParallelLayoutError if `config` cannot be split this way. Touches no process group."""
    tp, ep = parallel.tensor_model_parallel_size, parallel.expert_model_parallel_size
    sequence_parallel = parallel.sequence_parallel
    expert_tensor_parallel_size = parallel.expert_tensor_parallel_size
    etp = parallel.resolved_expert_tensor_parallel_size
    problems = []

    def must_divide(size_name, size, what, value, fix):
        if value % size:
            problems.append(f"{what}={value} is not divisible by {size_name}={size}: {fix}.")

    tp_name = "tensor_model_parallel_size"
    must_divide(tp_name, tp, "num_attention_heads", config.num_attention_heads,
                "use a tensor-parallel size that divides the head count")
    must_divide(tp_name, tp, "num_query_groups", config.resolved_num_query_groups,
                "each tensor-parallel rank needs whole key/value groups; lower "
                "tensor_model_parallel_size or raise num_query_groups")
    local = config.transformer_impl == "local" or (
        config.transformer_impl == "auto" and not transformer_engine_available())
    if config.multi_latent_attention and local:
        # The local spec splits the latent down projections column-wise (megatron-core's
        # get_gpt_layer_local_spec); Transformer Engine's replicate them.
        must_divide(tp_name, tp, "kv_lora_rank + qk_pos_emb_head_dim",
                    config.kv_lora_rank + config.qk_pos_emb_head_dim,
                    "the local flavour splits the key/value down projection over the "
                    "tensor-parallel ranks; pick sizes whose sum the tensor-parallel size divides")
        if config.q_lora_rank is not None:
            must_divide(tp_name, tp, "q_lora_rank", config.q_lora_rank,
                        "the local flavour splits the query down projection over the "
                        "tensor-parallel ranks; pick a multiple of the tensor-parallel size")
    must_divide(tp_name, tp, "ffn_hidden_size", config.resolved_ffn_hidden_size,
                "pick an ffn_hidden_size that is a multiple of the tensor-parallel size")
    must_divide(tp_name, tp, "vocab_size", config.vocab_size,
                "pad the vocabulary to a multiple of the tensor-parallel size "
                "(Megatron-LM: --make-vocab-size-divisible-by)")

    try:  # even, uneven or explicit: how megatron-core will split the layers
        parallel.stage_layer_counts(config.num_layers)
    except ConfigError as error:
        problems.append(str(error))

    if config.is_moe:
        must_divide("expert_model_parallel_size", ep, "num_experts", config.num_experts,
                    "use an expert-parallel size that divides the expert count")
        expert_ffn = config.resolved_moe_ffn_hidden_size
        must_divide("expert_tensor_parallel_size", etp, "moe_ffn_hidden_size", expert_ffn,
                    "pick an expert width that is a multiple of the expert tensor-parallel size")
        if config.moe_token_dispatcher_type == "flex" and tp * ep == 1:
            problems.append(
                "--moe-token-dispatcher-type flex needs tensor_model_parallel_size x "
                "expert_model_parallel_size > 1 (megatron-core's flex dispatcher): use more "
                "ranks for them, or the alltoall dispatcher.")
        if tp > 1 and not sequence_parallel:
            problems.append(
                f"MoE with tensor_model_parallel_size={tp} needs sequence parallelism "
                f"(megatron-core's token dispatchers expect sequence-sharded tokens): add "
                f"--sequence-parallel."
            )
    elif ep > 1 or (expert_tensor_parallel_size is not None and expert_tensor_parallel_size != tp):
        problems.append(
            f"expert_model_parallel_size={ep} / expert_tensor_parallel_size={etp} apply to MoE "
            f"models only, and this model is dense (num_experts is unset): drop them or set "
            f"num_experts."
        )
    if problems:
        raise ParallelLayoutError(
            "The model does not fit the parallel layout:\n  - " + "\n  - ".join(problems)
        )
