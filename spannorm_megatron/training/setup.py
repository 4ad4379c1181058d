"""Model chunks wrapped in megatron-core's DistributedDataParallel, and its optimizer."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    get_megatron_optimizer,
    get_standard_config_overrides,
)

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.config.performance import PerformanceConfig
from spannorm_megatron.model import build_model, transformer_config
from spannorm_megatron.model.fusions import (
    fuse_weight_gradients_in_te_layers,
    runnable_fusions,
    te_layers_fuse_weight_gradients,
)


def setup_model_and_optimizer(
    model_config: ModelConfig,
    parallel: ParallelConfig,
    optimizer_config: OptimizerConfig,
    performance: Optional[PerformanceConfig] = None,
    **transformer_overrides,
) -> Tuple[List[DistributedDataParallel], MegatronOptimizer]:
    """Build this rank's model chunks, wrap each in DDP, and create the optimizer.

    The one place where the run's configs become megatron-core's: `TransformerConfig` from the
    model, the layout, the precision/fusion/recompute choices (`performance`, default fp32) and
    any `transformer_overrides` (e.g. `calculate_per_token_loss`); the DDP config from the
    layout and the overlap choices; the optimizer's layout, precision and loss-scaling fields
    from the same, so that `optimizer_config` carries only the optimizer's own settings (lr,
    betas, clipping, decoupled lr...).

    Also wires the `TransformerConfig` the way megatron-core's schedules expect: gradient
    finalization (DP all-reduce, sequence-parallel norm-gain reduction, embedding-tie sync),
    loss scaling and the no-sync context for gradient accumulation.
    """
    performance = performance or PerformanceConfig()
    tconfig = transformer_config(model_config, **parallel.transformer_kwargs(),
                                 **performance.transformer_kwargs(),
                                 **runnable_fusions(model_config, performance),
                                 **transformer_overrides)
    ddp_config = DistributedDataParallelConfig(**performance.ddp_kwargs(parallel))
    optimizer_config = dataclasses.replace(
        optimizer_config, **performance.optimizer_kwargs(),
        use_distributed_optimizer=parallel.use_distributed_optimizer)
    chunks = build_model(model_config, tconfig)
    if te_layers_fuse_weight_gradients(model_config, performance):
        fuse_weight_gradients_in_te_layers(chunks)
    model = [
        DistributedDataParallel(
            config=tconfig,
            ddp_config=ddp_config,
            module=chunk,
            # Later virtual-stage chunks reduce while earlier ones still compute: no buckets
            # needed there (Megatron-LM does the same).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(optimizer_config, model,
                                       config_overrides=_param_group_overrides(optimizer_config))
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = _one_or_list([m.no_sync for m in model])
    if ddp_config.overlap_grad_reduce:
        # The pipeline schedules start each chunk's reduction as soon as its last backward
        # is done (Megatron-LM's default, --align-grad-reduce).
        tconfig.grad_sync_func = _one_or_list([m.start_grad_sync for m in model])
    return model, optimizer


def _param_group_overrides(config: OptimizerConfig) -> dict:
    """megatron-core's standard parameter groups (no weight decay for biases and 1-D weights;
    --decoupled-lr's peak and final learning rate for the embedding and output layer), as
    Megatron-LM builds them, with the decoupled groups marked `is_decoupled_lr`.

    Why the mark: megatron-core 0.16.1 pairs saved and current parameter groups on resume by
    (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) only, and its standard overrides
    leave is_decoupled_lr False, so a decoupled group collides with the plain one and the
    resume fails (or loads another group's learning rates); fixed upstream after 0.16
    (NVIDIA/Megatron-LM#4705). The mark is the field megatron-core's key already has for it."""
    overrides = get_standard_config_overrides(config)
    for key, override in overrides.items():
        if "max_lr" in override and config.decoupled_lr is not None:
            overrides[key] = {**override, "is_decoupled_lr": True}
    return overrides


def _one_or_list(functions: list):
    return functions[0] if len(functions) == 1 else functions


def initialize_tp_comm_overlap(performance: PerformanceConfig, *, seq_length: int,
                               micro_batch_size: int, hidden_size: int,
                               tensor_model_parallel_size: int) -> None:
    """Set up Transformer Engine's userbuffers for ``--tp-comm-overlap`` (after the process
    groups exist, before the model is built), sized as Megatron-LM sizes them: one sequence of
    micro-batch tokens by the hidden size. Nothing happens without the flag."""
    if not performance.tp_comm_overlap:
        return
    from transformer_engine.pytorch.module import base

    # TE 2.8+ takes the buffers' quantization modes (`use_fp8` is deprecated there): FP8 GEMMs
    # communicate in FP8, and the layers kept in bf16 under --first-last-layers-bf16 in bf16.
    modes = [base.UserBufferQuantizationMode.NONE]
    if performance.fp8_format is not None:
        modes = [base.UserBufferQuantizationMode.FP8] + (
            modes if performance.first_last_layers_bf16 else [])
    base.initialize_ub(shape=[seq_length * micro_batch_size, hidden_size],
                       tp_size=tensor_model_parallel_size, quantization_modes=modes,
                       dtype=performance.params_dtype)
