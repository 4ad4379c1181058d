"""Checkpoint test harness: a tiny model, its optimizer and LR schedule, deterministic data keyed
by the training position, and snapshots of everything a checkpoint must restore.

Used by tests/test_checkpoint.py in the pytest process (a world of one) and by
tests/_checkpoint_worker.py in fresh processes (one rank, or two under torchrun).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from spannorm_megatron.checkpoint import state as ckpt_state
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.training.loop import train_step
from spannorm_megatron.training.setup import setup_model_and_optimizer

SEQ = 16
MICRO_BATCH = 2
GLOBAL_BATCH = 4
VOCAB = 64
TOTAL_STEPS = 8


def model_config(dropout: bool = False, placement: str = "spannorm", moe: bool = False,
                 **overrides) -> ModelConfig:
    """The test model: 4 layers, width 32; `moe` gives 4 experts (top-2), `dropout` 0.1."""
    values = dict(
        norm_placement=placement, num_layers=4, hidden_size=32, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=64, vocab_size=VOCAB, max_sequence_length=SEQ,
        init_method_std=0.05,
        hidden_dropout=0.1 if dropout else 0.0, attention_dropout=0.1 if dropout else 0.0,
    )
    if moe:
        values.update(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
    values.update(overrides)
    return ModelConfig.recommended(**values)


def build(config: ModelConfig, parallel: ParallelConfig):
    """(model chunks, optimizer, scheduler) for the current megatron-core layout. The schedule
    counts samples, as Megatron-LM's does (the training step advances it by a global batch):
    2 steps of warm-up, cosine and weight-decay ramps over TOTAL_STEPS."""
    chunks, optimizer = setup_model_and_optimizer(
        config, parallel, OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3,
                                          weight_decay=0.01, clip_grad=1.0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=2 * GLOBAL_BATCH,
        lr_decay_steps=TOTAL_STEPS * GLOBAL_BATCH, lr_decay_style="cosine", start_wd=0.01,
        end_wd=0.05, wd_incr_steps=TOTAL_STEPS * GLOBAL_BATCH, wd_incr_style="linear",
    )
    return chunks, optimizer, scheduler


def global_batch(consumed_samples: int) -> torch.Tensor:
    """The next global batch of a run that has consumed `consumed_samples` samples."""
    generator = torch.Generator().manual_seed(1000 + consumed_samples)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)


def _micro_batches(tokens: torch.Tensor) -> List[dict]:
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    batches = []
    for start in range(rank * MICRO_BATCH, GLOBAL_BATCH, dp * MICRO_BATCH):
        sample = tokens[start:start + MICRO_BATCH]
        batches.append({
            "tokens": sample[:, :-1], "labels": sample[:, 1:],
            "loss_mask": torch.ones(MICRO_BATCH, SEQ),
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
        })
    return batches


def train(chunks, optimizer, scheduler, consumed_samples: int, steps: int) -> Dict[str, list]:
    """`steps` training steps (training.loop.train_step) from position `consumed_samples`;
    the losses (the last pipeline stage's, on every rank) and the learning rate of each step."""
    losses, lrs = [], []
    for _ in range(steps):
        batches = _micro_batches(global_batch(consumed_samples))
        result = train_step(chunks, optimizer, scheduler, iter(batches), len(batches), SEQ,
                            MICRO_BATCH, GLOBAL_BATCH)
        losses.append(result.loss)
        lrs.append(result.learning_rate)
        consumed_samples += GLOBAL_BATCH
    return {"losses": losses, "lrs": lrs, "consumed_samples": consumed_samples}


def sharded_tensors(chunks, optimizer=None) -> Dict[str, torch.Tensor]:
    """Every model (and optimizer) tensor this rank holds, keyed by global key and offset."""
    metadata = dict(ckpt_state.SHARDING_METADATA)
    sharded = ckpt_state.model_state(chunks, metadata)
    if optimizer is not None:
        sharded["optimizer"] = ckpt_state.optimizer_state(optimizer, dict(sharded), metadata,
                                                          is_loading=False)
    out = {}
    for item in nested_values(sharded):
        if isinstance(item, ShardedBase) and isinstance(getattr(item, "data", None), torch.Tensor):
            offset = getattr(item, "global_offset", ())
            out[f"{item.key}@{tuple(offset)}"] = item.data.detach().clone()
    return out
