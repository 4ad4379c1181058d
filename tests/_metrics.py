"""Harness of tests/test_metrics.py: one measured training step of a tiny model under a layout.

Used twice: in the pytest process (a world of one: the reference) and in
`tests/_metrics_worker.py` under a 2-rank `torchrun` (every layout in LAYOUTS). The initial
weights travel as a megatron-core dist checkpoint saved by the reference, so every layout
starts from the same weights, sees the same global batch (split over data-parallel ranks as
Megatron-LM's sampler does) and must measure the same per-layer signals.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.optimizer import OptimizerConfig

from _training import StepHooks
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.metrics import MoEMetrics, StabilitySignals
from spannorm_megatron.metrics.params_norm import params_l2_norm
from spannorm_megatron.training.loop import train_step
from spannorm_megatron.training.setup import setup_model_and_optimizer

SEQ = 16
MICRO_BATCH = 2
GLOBAL_BATCH = 8
VOCAB = 96
LR = 1e-2

COMBOS = {  # name -> (placement, moe, ModelConfig overrides)
    "spannorm-dense": ("spannorm", False, {}),
    "prenorm-dense": ("prenorm", False, {}),
    "spannorm-moe": ("spannorm", True, {}),
    # The output layer reads the word embeddings: under PP2 the last stage holds a copy.
    "spannorm-tied": ("spannorm", False, {"untie_embeddings_and_output_weights": False}),
}

LAYOUTS = {  # 2 ranks each -> which combos run under it
    "tp2_sp": (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
               ["spannorm-dense", "prenorm-dense", "spannorm-moe"]),
    "pp2": (ParallelConfig(pipeline_model_parallel_size=2), ["spannorm-dense", "spannorm-tied"]),
    "pp2_vpp2": (ParallelConfig(pipeline_model_parallel_size=2,
                                virtual_pipeline_model_parallel_size=2), ["spannorm-moe"]),
    "dp2_distopt": (ParallelConfig(use_distributed_optimizer=True), ["spannorm-dense"]),
    "dp2_ep2_distopt": (ParallelConfig(expert_model_parallel_size=2,
                                       use_distributed_optimizer=True), ["spannorm-moe"]),
}


def model_config(placement: str, moe: bool, **overrides) -> ModelConfig:
    return ModelConfig.recommended(**overrides,
        norm_placement=placement, num_layers=4, hidden_size=32, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=64, vocab_size=VOCAB, max_sequence_length=SEQ,
        init_method_std=0.05,
        num_experts=4 if moe else None, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=16 if moe else None, moe_aux_loss_coeff=1e-2,
    )


def global_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(99)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)


def micro_batch(sample: torch.Tensor) -> dict:
    return {
        "tokens": sample[:, :-1],
        "labels": sample[:, 1:],
        "loss_mask": torch.ones(sample.shape[0], SEQ),
        "position_ids": torch.arange(SEQ).expand(sample.shape[0], SEQ),
    }


def micro_batches(tokens: torch.Tensor) -> List[dict]:
    """This data-parallel rank's micro-batches: in each round of dp x micro-batch samples,
    rank r takes the r-th micro-batch (Megatron-LM's sampler order)."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    return [micro_batch(tokens[start:start + MICRO_BATCH])
            for start in range(rank * MICRO_BATCH, GLOBAL_BATCH, dp * MICRO_BATCH)]


def setup(config: ModelConfig, parallel: ParallelConfig):
    return setup_model_and_optimizer(
        config, parallel, OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=1.0,
                                          log_num_zeros_in_grad=True))


def sharded_state(chunks) -> dict:
    return {f"chunk{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_initial(chunks, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(sharded_state(chunks), directory)


def load_initial(chunks, optimizer, directory: str) -> None:
    loaded = dist_checkpointing.load(sharded_state(chunks), directory)
    for i, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded[f"chunk{i}"])
    optimizer.reload_model_params()


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the reads of tensor values into Python (on a GPU each one waits for the device:
    a host sync), by the name of the Tensor method that made them."""

    READS = {"tolist", "item", "__float__", "__int__", "__bool__", "numpy"}

    def __init__(self):
        super().__init__()
        self.calls: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def measured_step(chunks, optimizer, batches: List[dict], *, measure: bool = True,
                  before_optimizer_step=None) -> Dict:
    """One training step (training.loop.train_step) with the stability signals and MoE metrics
    measured (or not).

    `before_optimizer_step()`, if given, runs between backward and the optimizer step (the
    optimizer clips `main_grad` in place, so a test reads the gradients there)."""
    signals = StabilitySignals(chunks)
    moe = MoEMetrics(chunks)
    moe.start_step(measure=measure)
    if measure:
        signals.start_step()
    record = {}

    def before(optimizer):
        record["hooks_were_on"] = signals.enabled
        if before_optimizer_step is not None:
            before_optimizer_step()
        if measure:
            signals.before_optimizer_step(optimizer)

    def after():
        if measure:
            record["params_norm"] = params_l2_norm(chunks)
            signals.after_optimizer_step()

    result = train_step(chunks, optimizer, None, iter(batches), len(batches), SEQ, MICRO_BATCH,
                        GLOBAL_BATCH, monitor=StepHooks(before, after))
    record.update(loss=result.loss, grad_norm=result.grad_norm, num_zeros=result.num_zeros)
    if measure:
        record["signals"] = signals.collect()
        record["parts"] = signals.parts
        with HostReads() as reads:
            record["moe"] = moe.collect(num_microbatches=len(batches))
        record["moe_host_reads"] = reads.calls
    record["hooks_left"] = signals.enabled or moe.enabled
    return record


def to_json(record: Dict) -> Dict:
    """Layer numbers as JSON keys become strings; make them strings everywhere."""
    def convert(value):
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        return value
    return convert(record)
