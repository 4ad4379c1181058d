"""One training step and evaluation (the log lines they lead to: `training.log_format`).

The schedules (`get_forward_backward_func`), DDP, optimizer and LR scheduler are megatron-core's;
this module only sequences them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
from megatron.core.pipeline_parallel import get_forward_backward_func

from spannorm_megatron.runtime import current_device, has_accelerator
from spannorm_megatron.training.gpt_step import (
    forward_step,
    lm_loss_totals,
    reduce_lm_loss,
    reduce_over_data_parallel,
)


@dataclass
class StepResult:
    loss: Optional[float]
    """Mean token loss of the step (on every rank: broadcast from the last pipeline stage)."""

    grad_norm: Optional[float]
    """Global gradient norm before clipping (None when the step was skipped)."""

    skipped: bool
    """The optimizer refused the step (non-finite gradients with a loss scaler)."""

    learning_rate: float
    """Learning rate the step used."""

    bad_layer: Optional[int] = None
    """When gradients were non-finite: the first global layer number (0: outside the layers)."""

    num_zeros: Optional[float] = None
    """Zero gradient entries, counted by megatron-core's optimizer (with
    --log-num-zeros-in-grad; None otherwise and on skipped steps)."""


def _data_iterators(iterator, num_chunks: int):
    # Interleaved pipelining asks every model chunk for its own micro-batches.
    return [iterator] * num_chunks if num_chunks > 1 else iterator


def _model_arg(model: List[torch.nn.Module]):
    return model if len(model) > 1 else model[0]


def broadcast_from_last_stage(value: Optional[float]) -> Optional[float]:
    """Losses exist on the last pipeline stage only; every rank wants them for logging/exits."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return value
    tensor = torch.tensor([math.nan if value is None else value], dtype=torch.float64,
                          device=current_device())
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(tensor, src=last,
                                group=parallel_state.get_pipeline_model_parallel_group())
    return tensor.item()


def train_step(model, optimizer, scheduler, data_iterator: Iterator, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int,
               monitor=None, guard=None, forward_step_func=forward_step,
               empty_cache_level: int = 0) -> StepResult:
    """Forward and backward over the step's micro-batches, then one optimizer step (and one
    scheduler step of `global_batch_size` samples, unless `scheduler` is None).

    `monitor` (training.monitor.RunMonitor) sees the gradients before and the weights after the
    update; `guard` (training.guards.NonFiniteGuard) skips the update when a gradient is NaN/Inf
    (`StepResult.bad_layer` then says where it started). `empty_cache_level` is
    --empty-unused-memory-level: release the CUDA cache after the backward pass (1) and after
    the optimizer step too (2), where Megatron-LM does.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=_data_iterators(data_iterator, len(model)),
        model=_model_arg(model),
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    # The step's rate: the first group on the default schedule (not one of --decoupled-lr's
    # embedding/output groups), as Megatron-LM logs it.
    learning_rate = get_canonical_lr_for_logging(optimizer.param_groups)
    if learning_rate is None:
        learning_rate = optimizer.param_groups[0]["lr"]
    loss = broadcast_from_last_stage(reduce_lm_loss(losses_reduced))
    bad_layer = guard.first_bad_layer() if guard is not None else None
    if bad_layer is not None:
        return StepResult(loss=loss, grad_norm=None, skipped=True, learning_rate=learning_rate,
                          bad_layer=bad_layer)
    _empty_cache(empty_cache_level >= 1)
    if monitor is not None:
        monitor.before_optimizer_step(optimizer)
    update_successful, grad_norm, num_zeros = optimizer.step()
    if monitor is not None:
        monitor.after_optimizer_step()
    if update_successful and scheduler is not None:
        scheduler.step(increment=global_batch_size)
    _empty_cache(empty_cache_level >= 2)
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=not update_successful,
                      learning_rate=learning_rate, num_zeros=num_zeros)


class EvaluationStopped(Exception):
    """`evaluate` gave up between two iterations because the run must stop (SIGTERM, the time
    budget): `done` iterations ran, `reason` says why."""

    def __init__(self, done: int, reason: str):
        super().__init__(f"evaluation stopped after {done} iterations ({reason})")
        self.done, self.reason = done, reason


@torch.no_grad()
def evaluate(model, data_iterator: Iterator, eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int, empty_cache_level: int = 0,
             should_stop: Optional[Callable[[], Optional[str]]] = None) -> float:
    """Mean token loss over `eval_iters` global batches of the validation set (releasing the
    CUDA cache after each with --empty-unused-memory-level 1 or 2).

    `should_stop` (a collective: every rank calls it at the same point) is asked between two
    iterations; a reason from it ends the evaluation with `EvaluationStopped`, so that a
    preempted run stops within one iteration, as Megatron-LM's evaluation does for its time
    budget."""
    for chunk in model:
        chunk.eval()
    total = torch.zeros(2, dtype=torch.float64, device=current_device())
    try:
        for done in range(eval_iters):
            reason = should_stop() if done and should_stop is not None else None
            if reason is not None:
                raise EvaluationStopped(done, reason)
            losses_reduced = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=_data_iterators(data_iterator, len(model)),
                model=_model_arg(model),
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
            _empty_cache(empty_cache_level >= 1)
            if losses_reduced:
                total += lm_loss_totals(losses_reduced)
    finally:
        for chunk in model:
            chunk.train()
    # Each rank's sums, reduced once for the whole evaluation (ranks of the other pipeline
    # stages reduce their zeros among themselves).
    reduce_over_data_parallel(total)
    loss = (total[0] / total[1]).item() if total[1] > 0 else None
    return broadcast_from_last_stage(loss)


class ThroughputWindow:
    """Training time and iterations since the last log line, for its ms/iteration, tokens/s and
    MFU. Evaluation and checkpoint time is left out of both: after one, `exclude_since_last_step`
    restarts the clock without counting an iteration, so the average stays over the iterations
    whose time was counted (the loss `.item()` at the end of each step has synchronized the
    device)."""

    def __init__(self):
        self._mark = time.perf_counter()
        self.seconds = 0.0
        self.iterations = 0

    def step_done(self) -> None:
        now = time.perf_counter()
        self.seconds += now - self._mark
        self.iterations += 1
        self._mark = now

    def exclude_since_last_step(self) -> None:
        self._mark = time.perf_counter()

    def seconds_per_iteration(self) -> float:
        """The window's average; then a new window starts."""
        average = self.seconds / max(self.iterations, 1)
        self.seconds, self.iterations = 0.0, 0
        return average


def _empty_cache(when: bool) -> None:
    # On CPU there is no caching allocator to release (the flag said so once, at start).
    if when and has_accelerator():
        torch.cuda.empty_cache()
