"""What a run records besides the loss: throughput and MFU, per-layer stability signals, MoE
routing, memory, all written to TensorBoard with Megatron-LM's tag names.

Measurement happens only on logging steps (forward hooks are registered for those steps alone),
so the other steps pay nothing. The collectives inside `end_step` run on every rank.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from spannorm_megatron.config import ModelConfig
from spannorm_megatron.metrics import (
    CollapseAlarm,
    MoEMetrics,
    StabilitySignals,
    TensorBoardWriter,
    device_peak_flops,
    flops_per_token,
    mfu,
)
from spannorm_megatron.training.setup import gather_updated_parameters


class RunMonitor:
    def __init__(self, model_chunks: List[torch.nn.Module], model_config: ModelConfig, *,
                 seq_length: int, global_batch_size: int, num_microbatches: int,
                 log_interval: int, tensorboard_dir: Optional[str], dtype: torch.dtype,
                 recompute: Optional[str] = None, collapse_grad_ratio: float = 0.0):
        self.log_interval = log_interval
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.tokens_per_step = global_batch_size * seq_length
        self.num_microbatches = num_microbatches
        self.flops_per_token = flops_per_token(model_config, seq_length, recompute=recompute)
        self.peak_flops = device_peak_flops(dtype)
        self.num_devices = torch.distributed.get_world_size()
        self.writer = TensorBoardWriter(tensorboard_dir)
        self.signals = StabilitySignals(model_chunks)
        self.moe = MoEMetrics(model_chunks)
        self.collapse = CollapseAlarm(collapse_grad_ratio, model_config.num_layers)
        self.model_chunks = model_chunks
        self.measuring = False
        self.skipped_total = 0

    def write_config(self, config: dict) -> None:
        self.writer.write_config(config)

    def is_log_step(self, iteration: int) -> bool:
        return iteration % self.log_interval == 0

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

    def end_step(self, iteration: int, result, seconds_per_step: float,
                 loss_scale: float) -> Optional[str]:
        """On logging steps: reduce the measurements (every rank) and write them. Returns the
        collapse alarm's message on the step it fires (the same on every rank), else None."""
        if not self.measuring:
            return None
        self.measuring = False
        stability = self.signals.collect()
        moe = self.moe.collect(self.num_microbatches)
        self.writer.log_training(
            iteration, lm_loss=result.loss, learning_rate=result.learning_rate,
            batch_size=self.global_batch_size, seq_length=self.seq_length,
            iteration_time=seconds_per_step,
            grad_norm=result.grad_norm, loss_scale=loss_scale,
            flops_per_token=self.flops_per_token, num_devices=self.num_devices,
            peak_flops=self.peak_flops,
        )
        self.writer.log_stability(iteration, stability, self.signals.parts)
        self.writer.log_moe(iteration, moe)
        report = self.collapse.check(iteration, stability)
        if report is None:
            return None
        self.writer.log_collapse_alarm(iteration, report.message())
        return report.message()

    def record_skipped(self, iteration: int, skipped_total: int) -> None:
        """Steps skipped for non-finite gradients so far (written on logging steps and whenever
        the count grows)."""
        if self.is_log_step(iteration) or skipped_total != self.skipped_total:
            self.writer.add_scalar("skipped-iterations", skipped_total, iteration)
        self.skipped_total = skipped_total

    def log_validation(self, iteration: int, loss: float) -> None:
        self.writer.log_validation(iteration, loss)

    def close(self) -> None:
        self.signals.disable()
        self.moe.disable()
        self.writer.close()
