"""Model chunks wrapped in megatron-core's DistributedDataParallel, and its optimizer."""

from __future__ import annotations

from typing import List, Tuple

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.transformer.transformer_config import TransformerConfig

from spannorm_megatron.config import ModelConfig
from spannorm_megatron.model import build_model


def setup_model_and_optimizer(
    model_config: ModelConfig,
    tconfig: TransformerConfig,
    optimizer_config: OptimizerConfig,
    ddp_config: DistributedDataParallelConfig,
) -> Tuple[List[DistributedDataParallel], MegatronOptimizer]:
    """Build this rank's model chunks, wrap each in DDP, and create the optimizer.

    Also wires `tconfig` the way megatron-core's schedules expect: gradient finalization (DP
    all-reduce, sequence-parallel norm-gain reduction, embedding-tie sync), loss scaling and
    the no-sync context for gradient accumulation.
    """
    chunks = build_model(model_config, tconfig)
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
    optimizer = get_megatron_optimizer(optimizer_config, model)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    no_sync = [m.no_sync for m in model]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return model, optimizer
