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
    tconfig.no_sync_func = _one_or_list([m.no_sync for m in model])
    if ddp_config.overlap_grad_reduce:
        # The pipeline schedules start each chunk's reduction as soon as its last backward
        # is done (Megatron-LM's default, --align-grad-reduce).
        tconfig.grad_sync_func = _one_or_list([m.start_grad_sync for m in model])
    return model, optimizer


def _one_or_list(functions: list):
    return functions[0] if len(functions) == 1 else functions


def gather_updated_parameters(model: List[DistributedDataParallel]) -> None:
    """Give every rank the full updated parameters now.

    With ``--overlap-param-gather`` the distributed optimizer defers the all-gather of updated
    parameters into the next forward pass (DDP's forward pre-hooks, evaluation's too). Whatever
    reads the weights outside a forward (a checkpoint, weight statistics) calls this first;
    without the overlap the gather already happened in the optimizer step, and this does nothing.
    """
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)  # plain modules (tools, tests) too
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)
