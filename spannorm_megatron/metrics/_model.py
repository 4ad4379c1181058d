"""Finding the transformer layers of this rank's model chunks, and other shared plumbing.

Why: the metrics hook into layers by their *global* number (pipeline stages and virtual stages
renumber their local lists), whatever wrappers (megatron DDP, Float16Module) sit around each
`GPTModel`; that lookup lives here once.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple, Union

import torch

from spannorm_megatron.runtime import current_device


def as_chunk_list(model_chunks: Union[torch.nn.Module, Sequence[torch.nn.Module]]) -> List:
    """A model chunk or a list of them (one per virtual pipeline stage) -> a list."""
    if isinstance(model_chunks, torch.nn.Module):
        return [model_chunks]
    return list(model_chunks)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The module that owns `.decoder` (the GPTModel) inside DDP / Float16Module wrappers."""
    module = chunk
    while not hasattr(module, "decoder") and hasattr(module, "module"):
        module = module.module
    if not hasattr(module, "decoder"):
        raise TypeError(f"{type(chunk).__name__} wraps no model with a `.decoder` (GPTModel).")
    return module


def transformer_layers(chunks: Iterable[torch.nn.Module]) -> List[Tuple[int, torch.nn.Module]]:
    """(global 1-based layer number, layer) for every transformer layer this rank holds."""
    found = []
    for chunk in chunks:
        for layer in unwrap(chunk).decoder.layers:
            found.append((int(layer.layer_number), layer))
    return found


def total_layers(chunks: Sequence[torch.nn.Module]) -> int:
    """Layers of the whole model (all pipeline stages), from the model's TransformerConfig."""
    return int(unwrap(chunks[0]).config.num_layers)


def metrics_device() -> torch.device:
    """Where reduction buffers live: the rank's device (NCCL needs CUDA tensors, gloo CPU)."""
    return current_device()


def in_backward_pass() -> bool:
    """True while autograd runs a backward pass on this thread.

    Activation recompute (megatron's `CheckpointFunction`) runs the forward of layers again
    inside the backward pass; forward hooks must not count those tokens twice.
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1
