"""Batch arithmetic and the learning-rate schedule, as Megatron-LM sets them up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from spannorm_megatron.config.logging import MetricsLoggingConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.config.training import TrainingConfig
from spannorm_megatron.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    """Sequences per forward pass on one rank."""

    global_batch_size: int
    """Sequences per optimizer step over all data-parallel ranks."""

    data_parallel_size: int
    """Model replicas."""

    rampup: Optional[Tuple[int, int, int]] = None
    """--rampup-batch-size: (start global batch, increment, ramp-up samples)."""

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each rank accumulates per step (after any ramp-up)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def microbatch_counts(self) -> Tuple[int, ...]:
        """Every micro-batch count a step may have: each size of a --rampup-batch-size ramp,
        and the final one."""
        unit = self.micro_batch_size * self.data_parallel_size
        if self.rampup is None:
            return (self.num_microbatches,)
        start, increment, _ = self.rampup
        return tuple(size // unit for size in range(start, self.global_batch_size + 1, increment))

    def train_iters_for(self, train_samples: int) -> int:
        """Megatron-LM's `update_train_iters`: the steps --train-samples makes, the ramp-up's
        growing batches counted one by one (a partial last batch is dropped)."""
        if self.rampup is None:
            return train_samples // self.global_batch_size
        start, increment, ramp_samples = self.rampup
        calculator = RampupBatchsizeNumMicroBatchesCalculator(
            self.global_batch_size, self.micro_batch_size, self.data_parallel_size,
            decrease_batch_size_if_needed=False, rank=-1, start_global_batch_size=start,
            batch_size_increment=increment, ramup_samples=ramp_samples)
        iterations = consumed = 0
        while consumed <= ramp_samples and consumed <= train_samples:
            calculator.update(consumed, consistency_check=False)
            consumed += calculator.get_current_global_batch_size()
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // self.global_batch_size
        return iterations


def batch_layout(training: TrainingConfig, parallel: ParallelConfig,
                 world_size: int) -> BatchLayout:
    """Checked before any process group exists: the world size comes from the launcher."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"{tp} x --pipeline-model-parallel-size {pp}" + (
                f" x --context-parallel-size {cp}" if cp > 1 else "") +
            f" = {model_parallel}: launch a multiple of {model_parallel} ranks or change the "
            f"sizes."
        )
    dp = world_size // model_parallel
    micro = training.micro_batch_size
    global_batch = training.global_batch_size or micro * dp
    if global_batch % (micro * dp):
        raise ConfigError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
            f"{micro} x data-parallel size {dp} = {micro * dp}: "
            f"use a multiple of {micro * dp}."
        )
    rampup = None
    if training.rampup_batch_size is not None:
        rampup = tuple(training.rampup_batch_size)
        _check_rampup(rampup, global_batch, micro * dp)
    return BatchLayout(micro, global_batch, dp, rampup)


def _check_rampup(rampup: Tuple[int, int, int], global_batch: int, unit: int) -> None:
    """megatron-core's calculator asserts these in the first step; said here, before anything
    starts, in the flags' words."""
    start, increment, samples = rampup
    problem = None
    if start < 1 or increment < 1 or samples < 0:
        problem = "the start batch and the increment must be positive, the samples >= 0"
    elif start > global_batch or (global_batch - start) % increment:
        problem = (f"it must climb from its start {start} to --global-batch-size {global_batch} "
                   f"in steps of {increment}")
    elif start % unit or increment % unit:
        problem = (f"every batch size on the way must be a multiple of --micro-batch-size x "
                   f"data-parallel size = {unit}")
    if problem:
        raise ConfigError(f"--rampup-batch-size {start} {increment} {samples}: {problem}.")


def optimizer_config(training: TrainingConfig,
                     metrics: MetricsLoggingConfig) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        log_num_zeros_in_grad=metrics.log_num_zeros_in_grad,
        # The input embedding and output layer's own peak and final learning rate: megatron-
        # core's standard parameter-group overrides (get_megatron_optimizer) give them to the
        # parameters it marks is_embedding_or_output_parameter.
        decoupled_lr=training.decoupled_lr,
        decoupled_min_lr=training.decoupled_min_lr,
    )


class CourseScheduler(OptimizerParamScheduler):
    """megatron-core's scheduler, its learning rate times `lr_multiplier(num_steps)`: the course a
    rollback changed (training.rollback: a lower factor and a renewed warm-up), 1 before any.
    Its state and its checks against a checkpoint are megatron-core's, unchanged; the course is
    kept beside the checkpoints (checkpoint.rollbacks)."""

    def __init__(self, *args, **kwargs):
        self.lr_multiplier: Callable[[int], float] = lambda num_steps: 1.0
        super().__init__(*args, **kwargs)

    def get_lr(self, param_group: dict) -> float:
        return super().get_lr(param_group) * self.lr_multiplier(self.num_steps)


def lr_scheduler(training: TrainingConfig, optimizer: MegatronOptimizer,
                 global_batch_size: int) -> CourseScheduler:
    """Steps are counted in samples (Megatron-LM's convention), so a schedule survives a change
    of batch size on resume."""
    return CourseScheduler(
        optimizer,
        init_lr=training.lr_warmup_init,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_style="constant",
        lr_wsd_decay_style="exponential" if training.lr_decay_style == "WSD" else None,
        **training.scheduler_samples(global_batch_size),
        # On resume: the checkpoint's values unless overridden; a disagreement is refused
        # before this applies (checkpoint.load), unless --use-checkpoint-opt-param-scheduler.
        use_checkpoint_opt_param_scheduler=not training.override_opt_param_scheduler,
        override_opt_param_scheduler=training.override_opt_param_scheduler,
    )
