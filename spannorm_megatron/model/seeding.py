"""Initialization that does not depend on the pipeline layout.

megatron-core draws a layer's initial weights from the random stream of the rank that builds
it, and that stream is seeded per pipeline stage; so the same `--seed` gave a PP2 run other
weights than a PP1 run. Here every transformer layer is built right after reseeding from
(seed, its global layer number), and the output layer from (seed, L + 1), so each weight is a
function of the seed and its place in the model alone, whichever stage or virtual chunk holds
it. The embedding is built first on the first stage from the run's own seed, as before.
Tensor parallelism keeps megatron-core's rule (on CPU the full matrix is drawn, then sharded).
"""

from __future__ import annotations

import functools

import numpy
import torch


def reseed(tag: int) -> None:
    """Seed torch's stream and megatron-core's RNG tracker from (the run's seed, `tag`)."""
    from megatron.core import tensor_parallel

    from spannorm_megatron.runtime import base_seed

    seed = int(numpy.random.SeedSequence([base_seed(), tag]).generate_state(1)[0])
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
