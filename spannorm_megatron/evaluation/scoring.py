"""Scoring windows with a model: loss, perplexity and bits per byte over a whole text.

Two scorers take a group of batches and return the summed negative log-likelihood (nats) of
their scored tokens:

* `MegatronScorer`: this rank's model chunks under any TP / PP / DP layout. It reuses the
  training stack's own evaluation (`training.loop.evaluate`: megatron-core's forward-only
  schedules and `gpt_step.forward_step`, whose loss is summed over the loss mask and reduced over
  data parallel), so what is scored is exactly what validation scores. Data-parallel ranks take
  every DP-th batch; a rank short of one gets a batch with an empty loss mask.
* `HFScorer`: a transformers model, log-softmax of the logits in float32.

A batch is always `micro_batch_size` windows of `seq_length` tokens (shorter windows and missing
rows are padded, their positions masked), so pipeline stages exchange one fixed shape. The model
reads a window's tokens; the label of position t is token t+1, and the last position has none.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from spannorm_megatron.evaluation.text import Window


@dataclass
class Batch:
    tokens: torch.Tensor      # [b, s] long
    labels: torch.Tensor      # [b, s] long
    loss_mask: torch.Tensor   # [b, s] float, 1 where a label is scored
    scored_tokens: int
    scored_bytes: int


def make_batch(windows: List[Window], micro_batch_size: int, seq_length: int,
               device=None) -> Batch:
    tokens = torch.zeros(micro_batch_size, seq_length, dtype=torch.long)
    labels = torch.zeros_like(tokens)
    mask = torch.zeros(micro_batch_size, seq_length, dtype=torch.float)
    for row, window in enumerate(windows):
        n = len(window.ids)
        ids = torch.tensor(window.ids, dtype=torch.long)
        tokens[row, :n] = ids
        labels[row, :n - 1] = ids[1:]
        mask[row, :n - 1] = 1.0
    return Batch(tokens.to(device), labels.to(device), mask.to(device),
                 sum(w.scored_tokens for w in windows), sum(w.scored_bytes for w in windows))


class HFScorer:
    """Summed NLL of batches under a transformers causal LM."""

    def __init__(self, model, micro_batch_size: int, seq_length: int):
        self.model = model
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.device = next(model.parameters()).device
        self.group_size = 1

    @torch.no_grad()
    def __call__(self, batches: List[Batch]) -> float:
        total = 0.0
        for batch in batches:
            logits = self.model(input_ids=batch.tokens.to(self.device)).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch.labels.to(self.device).reshape(-1),
                reduction="none")
            total += float((nll * batch.loss_mask.to(self.device).reshape(-1)).double().sum())
        return total


class MegatronScorer:
    """Summed NLL of batches under this rank's megatron model chunks (call on every rank with
    the same batches; every rank gets the total)."""

    def __init__(self, model_chunks, micro_batch_size: int, seq_length: int):
        from megatron.core import parallel_state

        self.model = list(model_chunks)
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.group_size = self.dp_size

    def __call__(self, batches: List[Batch]) -> float:
        from spannorm_megatron.runtime import current_device
        from spannorm_megatron.training.loop import evaluate

        mine = batches[self.dp_rank::self.dp_size]
        per_rank = math.ceil(len(batches) / self.dp_size)
        empty = make_batch([], self.micro_batch_size, self.seq_length)
        mine += [empty] * (per_rank - len(mine))
        device = current_device()
        position_ids = torch.arange(self.seq_length, device=device).expand(
            self.micro_batch_size, -1)
        feed = [{"tokens": b.tokens.to(device), "labels": b.labels.to(device),
                 "loss_mask": b.loss_mask.to(device), "position_ids": position_ids}
                for b in mine]
        scored = sum(b.scored_tokens for b in batches)
        mean = evaluate(self.model, iter(feed), eval_iters=1, num_microbatches=per_rank,
                        seq_length=self.seq_length, micro_batch_size=self.micro_batch_size)
        return 0.0 if not scored else mean * scored


@dataclass
class Result:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    windows: int
    seq_length: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def score_text(scorer: Callable[[List[Batch]], float],
               window_stream: Iterator[Tuple[Window, int]], *, total_bytes: int,
               micro_batch_size: int, seq_length: int, batches_per_group: int = 8,
               progress: Optional[Callable[[str], None]] = None) -> Result:
    """Loss (nats per scored token), perplexity and bits per scored byte of the windows.

    Windows are scored in groups of `batches_per_group` x the scorer's group size (its data-
    parallel ranks) batches; after each group `progress` gets a line (bytes read of
    `total_bytes`, tokens scored, the running loss)."""
    start = time.perf_counter()
    nll, tokens, nbytes, count = 0.0, 0, 0, 0
    pending: List[Window] = []
    group = batches_per_group * getattr(scorer, "group_size", 1)
    read = 0

    def flush(last: bool) -> None:
        nonlocal nll, tokens, nbytes, pending
        batches = [make_batch(pending[i:i + micro_batch_size], micro_batch_size, seq_length)
                   for i in range(0, len(pending), micro_batch_size)]
        pending = []
        if batches:
            nll += scorer(batches)
            tokens += sum(b.scored_tokens for b in batches)
            nbytes += sum(b.scored_bytes for b in batches)
        if progress is not None and tokens:
            progress(f"[evaluate] {read / max(total_bytes, 1):4.0%} of {total_bytes:,} bytes | "
                     f"{tokens:,} tokens scored | loss {nll / tokens:.4f} | "
                     f"{time.perf_counter() - start:.1f} s" + (" | done" if last else ""))

    for window, read in window_stream:
        pending.append(window)
        count += 1
        if len(pending) == group * micro_batch_size:
            flush(last=False)
    flush(last=True)
    if tokens == 0:
        from spannorm_megatron.evaluation.text import EvaluationError

        raise EvaluationError("The text is shorter than two tokens: nothing to score.")
    loss = nll / tokens
    return Result(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                  bits_per_byte=nll / math.log(2) / max(nbytes, 1), tokens=tokens,
                  bytes=nbytes, windows=count, seq_length=seq_length,
                  seconds=round(time.perf_counter() - start, 2))


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
