"""What a run records besides the loss: Megatron-LM's TensorBoard scalars on their schedules,
throughput and MFU, per-layer stability signals, MoE routing, memory.

Three schedules, as in Megatron-LM (spannorm_megatron/metrics/tensorboard.py lists the tags):
every --tensorboard-log-interval iterations its per-iteration scalars, every --log-interval
iterations its timing tags and all of our own, every iteration the MoE router losses.
Per-layer measurement happens only on --log-interval steps (forward hooks are registered for
those steps alone), so the other steps pay nothing. The collectives inside `end_step` run on
every rank, under conditions that are the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from megatron.core import parallel_state

from spannorm_megatron.config.logging import MetricsLoggingConfig
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.metrics import (
    CollapseAlarm,
    MoEMetrics,
    StabilitySignals,
    TensorBoardWriter,
    device_peak_flops,
    flops_per_token,
    memory_stats,
    mfu,
)
from spannorm_megatron.metrics.params_norm import params_l2_norm
from spannorm_megatron.metrics.tensorboard import TAG_SKIPPED_ITERATIONS
from spannorm_megatron.runtime import current_device, gather_updated_parameters


@dataclass
class StepReport:
    """What `end_step` measured for the log line."""

    num_zeros: Optional[float] = None
    params_norm: Optional[float] = None
    alarm: Optional[str] = None
    """The collapse alarm's message on the step it fires (the same on every rank)."""


def max_over_model_parallel(value: Optional[float]) -> Optional[float]:
    """Collective: Megatron-LM's `reduce_max_stat_across_model_parallel_group` (a rank without
    trainable parameters has no statistic; any rank that has one gives it to all)."""
    stat = torch.tensor([-1.0 if value is None else float(value)], dtype=torch.float64,
                        device=current_device())
    torch.distributed.all_reduce(stat, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_model_parallel_group())
    return None if stat.item() == -1.0 else stat.item()


class RunMonitor:
    def __init__(self, model_chunks: List[torch.nn.Module], model_config: ModelConfig, *,
                 seq_length: int, global_batch_size: int, num_microbatches: int,
                 log_interval: int, tensorboard_dir: Optional[str], dtype: torch.dtype,
                 recompute: Optional[str] = None, collapse_grad_ratio: float = 0.0,
                 metrics: Optional[MetricsLoggingConfig] = None):
        self.log_interval = log_interval
        self.metrics = metrics or MetricsLoggingConfig()
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.tokens_per_step = global_batch_size * seq_length
        self.num_microbatches = num_microbatches
        self.flops_per_token = flops_per_token(model_config, seq_length, recompute=recompute)
        # Megatron-LM's `throughput` counts model FLOPs without recompute and router GEMM.
        self.megatron_flops_per_token = flops_per_token(model_config, seq_length,
                                                        include_router=False)
        self.peak_flops = device_peak_flops(dtype)
        self.bf16 = dtype == torch.bfloat16
        self.num_devices = torch.distributed.get_world_size()
        # Whether TensorBoard is on is the same on every rank (whether this rank writes is not):
        # it decides which collectives run.
        self.tensorboard = tensorboard_dir is not None
        self.writer = TensorBoardWriter(tensorboard_dir,
                                        max_queue=self.metrics.tensorboard_queue_size)
        self.signals = StabilitySignals(model_chunks)
        self.moe = MoEMetrics(model_chunks)
        self.collapse = CollapseAlarm(collapse_grad_ratio, model_config.num_layers)
        self.model_chunks = model_chunks
        self.measuring = False
        self.skipped_total = 0
        self.first_iteration = True

    def write_config(self, config: dict) -> None:
        self.writer.write_config(config)

    def is_log_step(self, iteration: int) -> bool:
        return iteration % self.log_interval == 0

    def is_tensorboard_step(self, iteration: int) -> bool:
        return self.tensorboard and iteration % self.metrics.tensorboard_log_interval == 0

    def begin_step(self, iteration: int) -> None:
        """Call before the step that will become `iteration`."""
        self.measuring = self.is_log_step(iteration)
        self.moe.start_step(measure=self.measuring)  # every step: it also clears the tracker
        if self.measuring:
            self.signals.start_step()

    def before_optimizer_step(self, optimizer) -> None:
        if self.measuring:
            self.signals.before_optimizer_step(optimizer)

    def after_optimizer_step(self) -> None:
        if self.measuring:
            gather_updated_parameters(self.model_chunks)  # the statistics read the new weights
            self.signals.after_optimizer_step()

    def mfu(self, seconds_per_step: float) -> Optional[float]:
        if self.peak_flops is None:
            return None
        return mfu(self.tokens_per_step / seconds_per_step, self.flops_per_token,
                   self.peak_flops, num_devices=self.num_devices)

    def throughput_tflops(self, seconds_per_step: float) -> float:
        """Megatron-LM's `throughput`: model TFLOP/s per device."""
        return (self.megatron_flops_per_token * self.tokens_per_step
                / (seconds_per_step * 1e12 * self.num_devices))

    def end_step(self, iteration: int, result, *, consumed_samples: int,
                 learning_rate: Optional[float], loss_scale: float,
                 seconds_per_step: Optional[float] = None,
                 global_batch_size: Optional[int] = None) -> StepReport:
        """Every iteration, on every rank: reduce what this iteration logs and write it.

        `seconds_per_step` is given on iterations that print a log line (the window's average)
        and None on the others; `learning_rate` is the one to log (Megatron-LM: after the
        scheduler's update); `global_batch_size` the step's (it grows under
        --rampup-batch-size; unset: the run's)."""
        report = StepReport()
        tensorboard_step = self.is_tensorboard_step(iteration)
        logged = tensorboard_step or seconds_per_step is not None
        if self.metrics.log_num_zeros_in_grad and logged:
            report.num_zeros = max_over_model_parallel(result.num_zeros)
        if self.metrics.log_params_norm and logged:
            report.params_norm = params_l2_norm(self.model_chunks, bf16=self.bf16)
        if tensorboard_step:
            self.writer.log_training(
                iteration, consumed_samples, lm_loss=result.loss, learning_rate=learning_rate,
                batch_size=global_batch_size or self.global_batch_size,
                loss_scale=loss_scale if self.metrics.log_loss_scale_to_tensorboard else None,
                world_size=(self.num_devices if self.metrics.log_world_size_to_tensorboard
                            else None),
                grad_norm=result.grad_norm, num_zeros=report.num_zeros,
                params_norm=report.params_norm,
                memory=(memory_stats() if self.metrics.log_memory_to_tensorboard
                        and self.writer.enabled else None))

        measured = self.measuring
        self.measuring = False
        moe = (self.moe.collect(self.num_microbatches) if measured
               else self.moe.collect_losses(self.num_microbatches))
        self.writer.log_moe(iteration, moe, per_layer_losses=self.metrics.moe_per_layer_logging)

        if seconds_per_step is not None and self.is_log_step(iteration):
            if self.metrics.log_timers_to_tensorboard and not self.first_iteration:
                self.writer.log_timers(
                    iteration, iteration_time=seconds_per_step,
                    throughput_tflops=(self.throughput_tflops(seconds_per_step)
                                       if self.metrics.log_throughput else None))
        self.first_iteration = False
        if not measured:
            return report

        stability = self.signals.collect()
        if seconds_per_step is not None:
            self.writer.log_speed(iteration, tokens_per_step=self.tokens_per_step,
                                  iteration_time=seconds_per_step,
                                  flops_per_token=self.flops_per_token,
                                  num_devices=self.num_devices, peak_flops=self.peak_flops)
        self.writer.log_stability(iteration, stability, self.signals.parts)
        alarm = self.collapse.check(iteration, stability)
        if alarm is not None:
            report.alarm = alarm.message()
            self.writer.log_collapse_alarm(iteration, report.alarm)
        return report

    def record_skipped(self, iteration: int, skipped_total: int) -> None:
        """Steps skipped for non-finite gradients so far (written on logging steps and whenever
        the count grows)."""
        if self.is_log_step(iteration) or skipped_total != self.skipped_total:
            self.writer.add_scalar(TAG_SKIPPED_ITERATIONS, skipped_total, iteration)
        self.skipped_total = skipped_total

    def log_validation(self, iteration: int, loss: float, consumed_samples: int = 0) -> None:
        self.writer.log_validation(iteration, loss, consumed_samples,
                                   ppl=self.metrics.log_validation_ppl_to_tensorboard)

    def close(self) -> None:
        self.signals.disable()
        self.moe.disable()
        self.writer.close()
