"""The forward step megatron-core's pipeline schedules call for a GPT model.

A batch is a dict of [micro_batch, seq] tensors: `tokens`, `labels`, `loss_mask`, `position_ids`,
and the [micro_batch, 1, seq, seq] causal `attention_mask` unless
--no-create-attention-mask-in-dataloader.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-summed LM loss, the token count and, for logging, both as this rank's pair.

    This is Megatron-LM's `pretrain_gpt.loss_func` contract (megatron-core's 3-tuple form):
    - the *logged* loss (`reduce_lm_loss`) is token-weighted over all micro-batches and all
      data-parallel ranks: sum of token losses / number of loss tokens. The report stays
      local, as in Megatron-LM (core_v0.16.1 pretrain_gpt.py): its `train_step` sums the
      micro-batches' reports and all-reduces them once per step, and so does
      `reduce_lm_loss`, instead of one collective per micro-batch;
    - the *gradient* follows `TransformerConfig.calculate_per_token_loss`: off (Megatron-LM's
      default), the schedule divides each micro-batch's sum by its own token count and averages
      those means over micro-batches and data-parallel ranks; on (`--calculate-per-token-loss`),
      it is the gradient of the token-weighted mean, as logged.
    The two differ only when loss masks keep different numbers of tokens per micro-batch.
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator: Optional[Iterator[Dict[str, torch.Tensor]]], model):
    """One micro-batch through one model chunk. Stages that need no data may get None."""
    # Only the chunk holding the embedding (tokens) or the loss (labels) reads a batch: with
    # interleaving, a rank's chunks share one iterator, and a middle chunk that drew from it
    # would shift the batches of the others (the labels would then be another sample's).
    reads = get_attr_wrapped_model(model, "pre_process") or get_attr_wrapped_model(
        model, "post_process")
    batch = next(data_iterator) if data_iterator is not None and reads else None
    if batch is not None and parallel_state.get_context_parallel_world_size() > 1:
        # Each context-parallel rank computes its two chunks of every sequence (megatron-core's
        # load-balanced causal split); the loss is reduced over them in loss_func.
        batch = get_batch_on_this_cp_rank(dict(batch))
    tokens = batch["tokens"] if batch is not None else None
    position_ids = batch["position_ids"] if batch is not None else None
    labels = batch["labels"] if batch is not None else None
    # The dataset's causal mask, as Megatron-LM's pretrain_gpt passes it; None (no
    # --no-create-attention-mask-in-dataloader, or a stage that reads no batch) lets the
    # attention make the same causal mask itself.
    attention_mask = batch.get("attention_mask") if batch is not None else None
    # The last stage returns per-token losses [b, s] when given labels, else hidden states.
    output = model(tokens, position_ids, attention_mask=attention_mask, labels=labels)
    loss_mask = batch["loss_mask"] if batch is not None else None
    return output, partial(loss_func, loss_mask)


def lm_loss_totals(losses_reduced) -> torch.Tensor:
    """This rank's [sum of token losses, loss tokens] over a step's micro-batches, in float64:
    float32 sums of a few micro-batches are exact in it, so the order in which micro-batches and
    ranks are added (per micro-batch first, or per rank first) cannot change the result."""
    return torch.stack([entry["lm loss"] for entry in losses_reduced]).double().sum(dim=0)


def reduce_over_data_parallel(totals: torch.Tensor) -> torch.Tensor:
    """Collective over the data-parallel (and context-parallel) ranks: the sum of `totals`.
    Every rank of a pipeline stage calls it, on the last stage only (others hold no losses)."""
    torch.distributed.all_reduce(
        totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return totals


def reduce_lm_loss(losses_reduced) -> Optional[float]:
    """Token-weighted mean loss of a step: all micro-batches, all data-parallel ranks (last
    pipeline stage only, else None). One all-reduce per step (Megatron-LM's `train_step`)."""
    if not losses_reduced:
        return None
    total = reduce_over_data_parallel(lm_loss_totals(losses_reduced))
    return (total[0] / total[1].clamp(min=1)).item()
