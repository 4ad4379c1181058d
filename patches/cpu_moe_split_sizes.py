"""CPU runtime: MoE all-to-all split sizes must be host sequences, as after a CUDA->CPU copy.

``maybe_move_tensor_to_cpu(..., as_numpy=True)`` converts only CUDA tensors, so on CPU the
token dispatcher's split sizes stay tensors and ``all_to_all_single`` rejects them. The
wrapper returns a numpy array, as the helper does for a CUDA tensor.
"""

from __future__ import annotations

import torch

from spannorm_megatron.runtime.device import has_accelerator

from .contract import Patch


def _token_dispatcher():
    from megatron.core.transformer.moe import token_dispatcher

    return token_dispatcher


def _probe(original) -> bool:
    """The upstream helper leaves a CPU tensor a tensor when asked for numpy."""
    move = original(_token_dispatcher(), "maybe_move_tensor_to_cpu")
    return not has_accelerator() and torch.is_tensor(move(torch.tensor([1]), as_numpy=True))


def _swaps():
    dispatcher = _token_dispatcher()
    move = dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        tensor = move(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(tensor):
            tensor = tensor.detach().numpy().copy()
        return tensor

    return [(dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)]


PATCH = Patch(
    "cpu_moe_split_sizes",
    target="megatron-core 0.16.1: transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
    why=__doc__,
    obsolete_when="is_needed() returns False: the helper converts CPU tensors with as_numpy.",
    probe=_probe,
    swaps=_swaps,
)
