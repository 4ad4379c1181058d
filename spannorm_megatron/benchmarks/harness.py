"""What `spannorm-benchmark` and `spannorm-benchmark-moe` share: one model with megatron-core's
DDP and optimizer, stepped on a fixed synthetic batch and timed (`Bench`); the description of the
machine that ran it; rank-0 progress lines; and the closing table and JSON document.

torch and megatron-core are imported where a model is built or the world is asked, not when a
benchmark's command line is parsed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import time
from typing import List, Sequence

IMPLS = ("auto", "local", "transformer_engine")
"""--transformer-impl of the benchmarks (auto: Transformer Engine where it runs)."""


def benchmark_model(placement: str, fields: dict, seq_length: int, transformer_impl: str):
    """The `ModelConfig` a benchmark times: the recommended recipe with `fields` (a preset's or
    a variant's shape) at one placement."""
    from spannorm_megatron.config.model import ModelConfig

    return ModelConfig.recommended(norm_placement=placement, max_sequence_length=seq_length,
                                   transformer_impl=transformer_impl, **fields)


class Bench:
    """One model, its optimizer and batch, alive until `close`; `step` runs and times one
    training step (megatron-core's schedule through `training.loop.train_step`).

    The layout and precision are checked against each other and this machine first, as
    `spannorm-train` checks them."""

    def __init__(self, model_config, parallel, performance, *, seq_length: int,
                 micro_batch: int, num_microbatches: int = 1):
        import torch
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from spannorm_megatron.runtime import current_device
        from spannorm_megatron.training.setup import setup_model_and_optimizer

        performance.check_layout(parallel)
        performance.check_machine(model_config)
        self.model_config = model_config
        self.model, self.optimizer = setup_model_and_optimizer(
            model_config, parallel, OptimizerConfig(optimizer="adam", lr=1e-4), performance)
        self.transformer_impl = self.model[0].config.transformer_impl
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=1e-4, max_lr=1e-4, min_lr=1e-4, lr_warmup_steps=0,
            lr_decay_steps=1, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
            wd_incr_steps=1, wd_incr_style="constant")
        generator = torch.Generator().manual_seed(0)
        device = current_device()
        tokens = torch.randint(0, model_config.vocab_size, (micro_batch, seq_length + 1),
                               generator=generator)
        self.batch = {
            "tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(micro_batch, seq_length, device=device),
            "position_ids": torch.arange(seq_length, device=device).expand(micro_batch, -1),
        }
        self.seq_length, self.micro_batch = seq_length, micro_batch
        self.num_microbatches = num_microbatches
        self.step_times: List[float] = []

    def close(self) -> None:
        """Drop the model, optimizer and batch. The model config's hooks (grad scaling, no-sync,
        finalize) point back at them, so only a collection frees the cycle; then the allocator
        hands the memory back before the next model is built."""
        import torch

        self.model = self.optimizer = self.scheduler = self.batch = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def step(self, monitor=None):
        """One training step's seconds (with a `monitor`: the step's result too)."""
        from spannorm_megatron.training.loop import train_step

        batches = iter([self.batch] * self.num_microbatches)
        synchronize()
        start = time.perf_counter()
        result = train_step(self.model, self.optimizer, self.scheduler, batches,
                            num_microbatches=self.num_microbatches, seq_length=self.seq_length,
                            micro_batch_size=self.micro_batch,
                            global_batch_size=self.micro_batch, monitor=monitor)
        synchronize()
        seconds = time.perf_counter() - start
        return seconds if monitor is None else (seconds, result)



def synchronize() -> None:
    """Wait for the GPU's queued work, so that a clock reading covers it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def environment() -> dict:
    """The software and device a benchmark ran on, for its JSON document."""
    import megatron.core
    import torch

    info = {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import transformer_engine

        info["transformer_engine"] = transformer_engine.__version__
    except ImportError:
        info["transformer_engine"] = None
    return info


def is_first_rank() -> bool:
    import torch

    return torch.distributed.get_rank() == 0


def log(tool: str, message: str) -> None:
    """A progress line on stderr, from the first rank only."""
    if is_first_rank():
        print(f"[{tool}] {message}", file=sys.stderr, flush=True)


def write_json(results: Sequence, options, **extra) -> None:
    """On the first rank, with the options' `output`: the JSON document (the command line's
    options, the environment, `extra` and the results so far), replaced whole and atomically,
    so that a run cut short keeps the rows it finished."""
    output = options.output
    if not output or not is_first_rank():
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = output + ".tmp"
    with open(partial, "w") as f:
        json.dump({"args": dataclasses.asdict(options), "environment": environment(), **extra,
                   "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    os.replace(partial, output)


def publish(table: str, results: Sequence, options, **extra) -> None:
    """On the first rank: print the table, and with the options' `output`, write the JSON
    document there (`write_json`)."""
    write_json(results, options, **extra)
    if not is_first_rank():
        return
    print(table)
    if options.output:
        print(f"wrote {options.output}")
