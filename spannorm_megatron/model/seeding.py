"""Initialization that does not depend on the pipeline layout.

megatron-core draws a layer's initial weights from the random stream of the rank that builds
it, and that stream is seeded per pipeline stage; so the same `--seed` gave a PP2 run other
weights than a PP1 run. Here every transformer layer is built right after reseeding from
(seed, its global layer number), and the output layer from (seed, L + 1), so each weight is a
function of the seed and its place in the model alone, whichever stage or virtual chunk holds
it. The embedding is built first on the first stage from the run's own seed, as before.
Tensor parallelism keeps megatron-core's rule (on CPU the full matrix is drawn, then sharded).

Experts likewise: megatron-core draws a rank's local experts one after another from its own
stream, so under EP2 the second rank's experts repeated the first rank's (CPU) or came from
a per-rank stream (GPU). Each expert's full matrices are drawn here from (the layer's stream,
its global expert index), then cut to this rank's expert-tensor-parallel shard.
"""

from __future__ import annotations

import functools

import numpy
import torch


def _derive(*entropy: int) -> int:
    return int(numpy.random.SeedSequence(list(entropy)).generate_state(1)[0])


def reseed(tag: int) -> None:
    """Seed torch's stream and megatron-core's RNG tracker from (the run's seed, `tag`)."""
    from megatron.core import tensor_parallel

    from spannorm_megatron.runtime import base_seed

    seed = _derive(base_seed(), tag)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


@functools.lru_cache(maxsize=None)
def seeded_layer(layer_class: type) -> type:
    """`layer_class` built from a stream seeded by its global layer number."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        number = layer_number + get_transformer_layer_offset(config, kwargs.get("vp_stage"))
        reseed(number)
        layer_class.__init__(self, config, submodules, layer_number, *args, **kwargs)
        if number == config.num_layers:
            reseed(config.num_layers + 1)  # the last stage builds the output layer next

    return type(layer_class.__name__, (layer_class,), {
        "__init__": __init__, "__module__": layer_class.__module__,
        "__doc__": layer_class.__doc__, "__qualname__": layer_class.__qualname__})


@functools.lru_cache(maxsize=None)
def seeded_experts(experts_class: type) -> type:
    """`experts_class` (megatron-core's SequentialMLP or TEGroupedMLP) whose experts are drawn
    by global expert index."""

    def __init__(self, num_local_experts, config, *args, **kwargs):
        # The layer's stream is at the same point on every expert-parallel layout here.
        base = int(torch.randint(0, 2**62, (1,), device="cpu").item())  # also under meta
        experts_class.__init__(self, num_local_experts, config, *args, **kwargs)
        _redraw_experts(self, base)
        # What the layer builds next draws alike whatever number of experts was drawn here.
        torch.manual_seed(_derive(base, 2**31))

    return type(experts_class.__name__, (experts_class,), {
        "__init__": __init__, "__module__": experts_class.__module__,
        "__doc__": experts_class.__doc__, "__qualname__": experts_class.__qualname__})


def _local_expert_weights(experts):
    """(fc1 weight, fc2 weight) of each local expert, in local order."""
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return [(e.linear_fc1.weight, e.linear_fc2.weight) for e in experts.local_experts]
    # TEGroupedMLP keeps one weight{i} per local expert in each grouped linear.
    return [(getattr(experts.linear_fc1, f"weight{i}"), getattr(experts.linear_fc2, f"weight{i}"))
            for i in range(experts.num_local_experts)]


@torch.no_grad()
def _redraw_experts(experts, base: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    config = experts.config
    rank = parallel_state.get_expert_tensor_parallel_rank()
    size = parallel_state.get_expert_tensor_parallel_world_size()
    first = parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts
    for index, (fc1, fc2) in enumerate(_local_expert_weights(experts)):
        if fc1.is_meta:  # built to be loaded into (checkpoint conversion): nothing to draw
            return
        # fc1 is column-parallel ([gate; up] interleaved per shard when gated), fc2 row-parallel.
        for which, (weight, dim, init, stride) in enumerate((
                (fc1, 0, config.init_method, 2 if config.gated_linear_unit else 1),
                (fc2, 1, config.output_layer_init_method, 1))):
            full = list(weight.shape)
            full[dim] *= size
            torch.manual_seed(_derive(base, first + index, which))
            shard = torch.empty(weight.shape, dtype=torch.float32)
            _initialize_affine_weight_cpu(shard, full[0], full[1], weight.shape[dim], dim, init,
                                          stride, params_dtype=torch.float32, rank=rank,
                                          world_size=size, skip_set_tensor_parallel_attributes=True)
            weight.copy_(shard)
