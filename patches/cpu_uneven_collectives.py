"""CPU runtime: uneven gathers and reduce-scatters (expert tensor parallelism) on gloo.

Expert tensor parallelism gathers and reduce-scatters token blocks of different sizes per rank
(``output_split_sizes`` / ``input_split_sizes``). NCCL takes uneven lists; gloo's all_gather
requires equal sizes and it has no list reduce-scatter; the replacements pad-gather-trim and
all-reduce-then-slice. Equal-split calls keep megatron's code.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from spannorm_megatron.runtime.device import has_accelerator

from .contract import Patch


def _mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


def _swaps():
    mappings = _mappings()
    gather = mappings._gather_along_first_dim
    reduce_scatter = mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        # Pad every block to the largest, gather, and trim each back.
        largest = max(output_split_sizes)
        padded = input_.new_zeros((largest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(blocks, padded, group=group)
        return torch.cat([b[:n] for b, n in zip(blocks, output_split_sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                        use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        # Reduce everything and keep this rank's block: more traffic, same result.
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].contiguous()

    return [(mappings, "_gather_along_first_dim", _gather_along_first_dim),
            (mappings, "_reduce_scatter_along_first_dim", _reduce_scatter_along_first_dim)]


def _probe(original) -> bool:
    """megatron's helpers take uneven split sizes, and this process runs over gloo."""
    mappings = _mappings()
    takes_splits = all(
        name in inspect.signature(original(mappings, helper)).parameters
        for helper, name in (("_gather_along_first_dim", "output_split_sizes"),
                             ("_reduce_scatter_along_first_dim", "input_split_sizes")))
    return not has_accelerator() and takes_splits


PATCH = Patch(
    "cpu_uneven_collectives",
    target=("megatron-core 0.16.1: tensor_parallel.mappings._gather_along_first_dim and "
            "_reduce_scatter_along_first_dim, over gloo"),
    why=__doc__,
    obsolete_when="gloo supports uneven all_gather and list reduce_scatter, or CPU runs end.",
    probe=_probe,
    swaps=_swaps,
)
