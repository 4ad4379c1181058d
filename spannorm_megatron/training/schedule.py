"""Batch arithmetic and the learning-rate schedule, as Megatron-LM sets them up."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from spannorm_megatron.errors import ConfigError


@dataclass(frozen=True)
class BatchLayout:
    micro_batch_size: int
    """Sequences per forward pass on one rank."""

    global_batch_size: int
    """Sequences per optimizer step over all data-parallel ranks."""

    data_parallel_size: int
    """Model replicas."""

    @property
    def num_microbatches(self) -> int:
        """Micro-batches each rank accumulates per step."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)


def batch_layout(args: argparse.Namespace, world_size: int) -> BatchLayout:
    """Checked before any process group exists: the world size comes from the launcher."""
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"{args.tensor_model_parallel_size} x --pipeline-model-parallel-size "
            f"{args.pipeline_model_parallel_size} = {model_parallel}: launch a multiple of "
            f"{model_parallel} ranks or change the sizes."
        )
    dp = world_size // model_parallel
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    if global_batch % (args.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp} = {args.micro_batch_size * dp}: "
            f"use a multiple of {args.micro_batch_size * dp}."
        )
    return BatchLayout(args.micro_batch_size, global_batch, dp)


def optimizer_config(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
    )


def lr_scheduler(args: argparse.Namespace, optimizer: MegatronOptimizer,
                 global_batch_size: int) -> OptimizerParamScheduler:
    """Steps are counted in samples (Megatron-LM's convention), so a schedule survives a change
    of batch size on resume."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * global_batch_size,
        lr_decay_steps=args.lr_decay_iters * global_batch_size,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * global_batch_size,
        wd_incr_style="constant",
        wsd_decay_steps=(args.lr_wsd_decay_iters * global_batch_size
                         if args.lr_wsd_decay_iters else None),
        lr_wsd_decay_style="exponential" if args.lr_decay_style == "WSD" else None,
        # On resume: the checkpoint's values unless overridden; a disagreement is refused
        # before this applies (checkpoint.load), unless --use-checkpoint-opt-param-scheduler.
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
