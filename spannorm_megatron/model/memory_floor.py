"""The least memory a model's training state takes, checked against the machine before anything
is built.

Sizes that are each valid can still make a model no machine here holds: a vocabulary padded to a
multiple of 10^9, a learned position table of 10^9 rows, a thousand experts. megatron-core then
asks the allocator for the first huge tensor and the run ends in an allocator traceback, or, on
a host without swap, the kernel's OOM killer takes this process or a neighbour's. So the run
counts its parameters from the configuration and refuses, naming the sizes, when their weights,
gradients and Adam's two moments cannot fit, whatever else the run would need.

The count is a floor, never an estimate that could refuse a run that fits: only the matrices
every flavour of a layer holds (norms, biases and multi-latent attention's projections are left
out), gradients in the weights' own dtype, Adam's moments in fp32 once per model (the
distributed optimizer shards them, it does not drop them), activations not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.machine import has_accelerator, host_memory_bytes

GIB = 1024 ** 3
HOST_BYTES_PER_LAYER = 256 * 1024
"""Host memory one built layer's Python and megatron-core objects take beyond its tensors, at
least: about 520 KiB measured (spannorm-train's peak resident memory at 200 and 800 layers of
hidden size 32, local implementation, torch 2.13 on CPU), halved to stay a floor. Tiny layers
by the hundred thousand exhaust the host this way while their weights fit anywhere."""
ADAM_STATE_BYTES = 8
"""Adam's first and second moments, fp32, per parameter."""


@dataclass(frozen=True)
class Part:
    what: str
    """The part and the flags that size it, as a message names them."""
    parameters: int
    shard_ways: int
    """It is split into at least this many pieces, one per rank (at most its busiest rank's)."""
    copy_ways: int
    """The ranks that hold one copy between them: the run holds world size / this many."""


def model_parts(config: ModelConfig, parallel: ParallelConfig) -> List[Part]:
    """The model's largest matrices, grouped by what sizes them (`config.vocab_size` is the
    padded vocabulary)."""
    h, vocab = config.hidden_size, config.vocab_size
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    experts_split = parallel.expert_model_parallel_size * \
        parallel.resolved_expert_tensor_parallel_size * pp
    vocabulary = (f"the vocabulary ({vocab}, padded to a multiple of "
                  f"--make-vocab-size-divisible-by) x --hidden-size {h}")
    # The embeddings live on one pipeline stage, split over its tensor-parallel ranks.
    parts = [Part(f"word embeddings: {vocabulary}", vocab * h, tp, tp * pp)]
    if config.untie_embeddings_and_output_weights:
        parts.append(Part(f"output layer: {vocabulary}", vocab * h, tp, tp * pp))
    if config.position_embedding_type == "learned_absolute":
        parts.append(Part(f"position embeddings: --max-position-embeddings "
                          f"{config.max_sequence_length} x --hidden-size {h}",
                          config.max_sequence_length * h, 1, pp))
    inputs = 2 if config.swiglu else 1  # SwiGLU's fc1 holds the gate and the value

    def mlp(width: int) -> int:
        return (inputs + 1) * h * width

    moe = _moe_layers(config)
    dense = config.num_layers - moe
    if not config.multi_latent_attention:
        heads = config.num_attention_heads * config.resolved_kv_channels
        groups = config.resolved_num_query_groups * config.resolved_kv_channels
        parts.append(Part(f"attention: --num-layers {config.num_layers} x --hidden-size {h} x "
                          f"heads", config.num_layers * (2 * h * heads + 2 * h * groups),
                          tp * pp, tp * pp))
    if dense:
        ffn = config.resolved_ffn_hidden_size
        parts.append(Part(f"MLPs: {dense} dense layers x --hidden-size {h} x "
                          f"--ffn-hidden-size {ffn}", dense * mlp(ffn), tp * pp, tp * pp))
    if moe:
        width = config.resolved_moe_ffn_hidden_size
        parts.append(Part(f"experts: {moe} MoE layers x --num-experts {config.num_experts} x "
                          f"--hidden-size {h} x --moe-ffn-hidden-size {width}",
                          moe * config.num_experts * mlp(width), experts_split,
                          experts_split))
        if config.moe_shared_expert_intermediate_size:
            shared = config.moe_shared_expert_intermediate_size
            parts.append(Part(f"shared experts: {moe} MoE layers x --hidden-size {h} x "
                              f"--moe-shared-expert-intermediate-size {shared}",
                              moe * mlp(shared), tp * pp, tp * pp))
    return parts


def _moe_layers(config: ModelConfig) -> int:
    """How many layers are MoE, without listing every layer (a count of 10^9 layers is what
    this check is there to refuse)."""
    if not config.is_moe:
        return 0
    if isinstance(config.moe_layer_freq, int):  # layers 0, freq, 2 freq, ... (moe_layer_pattern)
        return (config.num_layers - 1) // config.moe_layer_freq + 1
    return sum(config.moe_layer_freq)


def training_floor_bytes(parts: List[Part], weight_bytes: int, world_size: int,
                         whole_model_here: bool) -> int:
    """The least memory the training state of `parts` takes: on this node when
    `whole_model_here` (every rank of the run is on it: each copy of a part holds weights and
    gradients, Adam's moments are held once), else on the busiest rank."""
    if whole_model_here:
        return sum(part.parameters * (2 * weight_bytes * max(1, world_size // part.copy_ways)
                                      + ADAM_STATE_BYTES) for part in parts)
    return max(part.parameters // part.shard_ways for part in parts) * 2 * weight_bytes


def _device_memory() -> Tuple[Optional[int], str]:
    """(bytes, "one GPU" or "this machine"): the memory a rank's training state must fit in."""
    if has_accelerator():
        import torch

        return torch.cuda.get_device_properties(0).total_memory, "one GPU"
    return host_memory_bytes(), "this machine"


def check_model_fits_memory(config: ModelConfig, parallel: ParallelConfig, *,
                            half_precision: bool, world_size: int,
                            local_world_size: int) -> None:
    """Raise ConfigError when the training state of `config`, split as `parallel` says, cannot
    fit the memory there is (see the module docstring)."""
    available, where = _device_memory()
    if available:
        _check_state_fits(config, parallel, available, where, half_precision=half_precision,
                          world_size=world_size, local_world_size=local_world_size)
    _check_layers_fit_host(config, parallel, min(world_size, local_world_size))


def _check_state_fits(config: ModelConfig, parallel: ParallelConfig, available: int, where: str,
                      *, half_precision: bool, world_size: int, local_world_size: int) -> None:
    parts = model_parts(config, parallel)
    on_host = where == "this machine"
    whole_model_here = on_host and local_world_size >= world_size
    needed = training_floor_bytes(parts, 2 if half_precision else 4, world_size,
                                  whole_model_here)
    if needed <= available:
        return
    largest = max(parts, key=lambda part: part.parameters)
    total = sum(part.parameters for part in parts)
    ranks = f" on {world_size} ranks" if whole_model_here and world_size > 1 else ""
    raise ConfigError(
        f"this model cannot be trained here: its weights, gradients and optimizer state alone "
        f"take at least {needed / GIB:,.1f} GiB ({total:,} parameters{ranks}), and {where} "
        f"has {available / GIB:,.1f} GiB. Most of them are the "
        f"{largest.what} ({largest.parameters:,}): make it smaller, or spread the model over "
        f"more devices.")


def _check_layers_fit_host(config: ModelConfig, parallel: ParallelConfig,
                           ranks_here: int) -> None:
    """Every rank on this node builds its pipeline stage's layers as host objects."""
    available = host_memory_bytes()
    pp = parallel.pipeline_model_parallel_size
    layers_per_rank = config.num_layers // pp  # at least (uneven stages hold more elsewhere)
    needed = layers_per_rank * ranks_here * HOST_BYTES_PER_LAYER
    if not available or needed <= available:
        return
    raise ConfigError(
        f"--num-layers {config.num_layers} cannot be built here: {layers_per_rank:,} layers on "
        f"each of {ranks_here} rank(s) on this machine take at least {needed / GIB:,.1f} GiB of "
        f"host memory as objects alone (about {HOST_BYTES_PER_LAYER // 1024} KiB a layer, "
        f"whatever its size), and it has {available / GIB:,.1f} GiB. Use fewer layers, or "
        f"split them over more pipeline stages on more machines "
        f"(--pipeline-model-parallel-size).")
