"""MoE experts with linear biases on one tensor-parallel rank: ``RuntimeError: Output 0 of
_ReduceFromModelParallelRegion is a view and is being modified inplace``.

Not a CPU issue: it hits the local (non-TE) linear layers on any device, on the first forward of
an MoE model with biases (`--num-experts` without `--disable-bias-linear`) whose experts use no
explicit expert communication (tensor- and expert-parallel size 1: a single GPU, or data
parallelism only). megatron-core's ``SequentialMLP`` hands every expert its routing probabilities,
and ``MLP.forward`` then adds the scaled bias in place (``output += output_bias * scale``) to
``RowParallelLinear``'s output. On one tensor-parallel rank that output is the input of
``_ReduceFromModelParallelRegion`` returned as-is by a custom autograd function, which autograd
forbids modifying in place. An all-reduce over one rank is the identity: skipping the function
there gives the same values and gradients, and an ordinary tensor that may be modified in place.
"""

from __future__ import annotations

import inspect

from .contract import Patch

_NAME = "reduce_from_tensor_model_parallel_region"


def _layers():
    from megatron.core.tensor_parallel import layers

    return layers


def _reduce_unless_alone(input_, group=None):
    from megatron.core.tensor_parallel import mappings
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    if group is None:
        group = get_tensor_model_parallel_group_if_none(group)
    if group is not None and group.size() == 1:
        return input_
    return mappings.reduce_from_tensor_model_parallel_region(input_, group=group)


def _probe(original) -> bool:
    """MLP adds the expert bias in place, onto what the region's function returns as-is."""
    from megatron.core.transformer.mlp import MLP

    source = inspect.getsource(MLP.forward)
    return "output +=" in source and original(_layers(), _NAME) is not _reduce_unless_alone


PATCH = Patch(
    "expert_bias_inplace",
    target="megatron-core 0.16.x (seen on 0.16.1): tensor_parallel.layers."
           "reduce_from_tensor_model_parallel_region, as RowParallelLinear calls it",
    why=__doc__,
    obsolete_when="MLP.forward adds the expert bias out of place (output = output + ...), or "
                  "_ReduceFromModelParallelRegion returns a new tensor on one rank.",
    probe=_probe,
    swaps=lambda: [(_layers(), _NAME, _reduce_unless_alone)],
)
