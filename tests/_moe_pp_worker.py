"""Rank program of tests/test_megatron_lm_moe_pp_flags.py, launched by torchrun on 4 ranks.

    torchrun --standalone --nproc_per_node 4 tests/_moe_pp_worker.py OUT_DIR

For every case in CASES: lay the ranks out as it says (`process.initialize`), build the model
and optimizer as a training run does (`training.setup.setup_model_and_optimizer`), train STEPS
steps with the training loop's `train_step` on a fixed global batch, and write this rank's
record to OUT_DIR/<case>/rank<r>.json: losses, gradient norms, the order in which its model
chunks ran forward, its pipeline group's ranks and the schedule fields megatron-core got. The
weights start equal in every case (layout-invariant seeding, spannorm_megatron/model/seeding.py),
so the test compares each flag against the same layout without it. The test runs it in strict
device mode (runtime/strict_devices.py), so the GPU path's device rules hold too.
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import os
import sys

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from launch import reporting, write_result
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.runtime import current_device, destroy
from spannorm_megatron.process import initialize
from spannorm_megatron.training.gpt_step import forward_step
from spannorm_megatron.training.loop import train_step
from spannorm_megatron.training.setup import setup_model_and_optimizer

SEQ, MICRO_BATCH, GLOBAL_BATCH, STEPS = 16, 2, 8, 2

_MOE = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=1e-2,
            moe_token_dispatcher_type="alltoall", moe_shared_expert_intermediate_size=32)
_INTERLEAVED = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                    virtual_pipeline_model_parallel_size=2)  # data-parallel 1: 4 micro-batches

CASES = {  # name -> (layout, ModelConfig overrides)
    # p2p overlap (Megatron-LM's default) against batched sends and receives; batching with
    # virtual stages needs more than two stages: 4 stages x 2 chunks of one layer.
    "pp4_vpp2": (ParallelConfig(pipeline_model_parallel_size=4,
                                virtual_pipeline_model_parallel_size=2), dict(num_layers=8)),
    "pp4_vpp2_batched_p2p": (ParallelConfig(pipeline_model_parallel_size=4,
                                            virtual_pipeline_model_parallel_size=2,
                                            overlap_p2p_comm=False), dict(num_layers=8)),
    # Micro-batch groups of 4 instead of 2 (= the stage count), with warm-up/flush overlap.
    "tp2_pp2_vpp2": (ParallelConfig(**_INTERLEAVED), {}),
    "tp2_pp2_vpp2_group4_flush": (ParallelConfig(**_INTERLEAVED,
                                                 microbatch_group_size_per_vp_stage=4,
                                                 overlap_p2p_comm_warmup_flush=True), {}),
    # Rank order: data parallel before pipeline (default) or after it.
    "pp2_dp2": (ParallelConfig(pipeline_model_parallel_size=2), {}),
    "pp2_dp2_tp_pp_dp": (ParallelConfig(pipeline_model_parallel_size=2,
                                        use_tp_pp_dp_mapping=True), {}),
    # The shared expert computed while the alltoall dispatcher communicates, under TP+SP x EP.
    "tp2_sp_ep2_moe": (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                      expert_model_parallel_size=2,
                                      expert_tensor_parallel_size=1), _MOE),
    "tp2_sp_ep2_moe_shared_overlap": (ParallelConfig(tensor_model_parallel_size=2,
                                                     sequence_parallel=True,
                                                     expert_model_parallel_size=2,
                                                     expert_tensor_parallel_size=1),
                                      dict(_MOE, moe_shared_expert_overlap=True)),
}


def model_config(**overrides) -> ModelConfig:
    values = dict(norm_placement="spannorm", num_layers=4, hidden_size=32,
                  num_attention_heads=4, ffn_hidden_size=64, vocab_size=128,
                  max_sequence_length=SEQ, init_method_std=0.05, transformer_impl="local")
    return ModelConfig.recommended(**{**values, **overrides})


def micro_batches():
    """This data-parallel rank's micro-batches of one fixed global batch (Megatron-LM's
    assignment: in each round of dp x micro-batch samples, rank r takes the r-th)."""
    device = current_device()  # where the training loader puts them
    tokens = torch.randint(0, 128, (GLOBAL_BATCH, SEQ + 1),
                           generator=torch.Generator().manual_seed(2024)).to(device)
    dp, rank = (parallel_state.get_data_parallel_world_size(),
                parallel_state.get_data_parallel_rank())
    return [{"tokens": sample[:, :-1], "labels": sample[:, 1:],
             "loss_mask": torch.ones(MICRO_BATCH, SEQ, device=device),
             "position_ids": torch.arange(SEQ, device=device).expand(MICRO_BATCH, SEQ)}
            for start in range(rank * MICRO_BATCH, GLOBAL_BATCH, dp * MICRO_BATCH)
            for sample in [tokens[start:start + MICRO_BATCH]]]


def run(parallel: ParallelConfig, overrides: dict) -> dict:
    initialize(parallel, seed=1234)
    model, optimizer = setup_model_and_optimizer(
        model_config(**overrides), parallel,
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1.0))
    chunk_of = {id(chunk): index for index, chunk in enumerate(model)}
    order = []

    def recording_step(data_iterator, chunk):
        order.append(chunk_of[id(chunk)])
        return forward_step(data_iterator, chunk)

    batches = micro_batches()
    losses, grad_norms = [], []
    for _ in range(STEPS):
        result = train_step(model, optimizer, None, iter(batches), len(batches), SEQ,
                            MICRO_BATCH, GLOBAL_BATCH, forward_step_func=recording_step)
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
    config = model[0].config
    shared_overlap = [layer.mlp.shared_expert_overlap for chunk in model
                      for layer in chunk.module.decoder.layers if hasattr(layer.mlp, "router")]
    return dict(
        losses=losses, grad_norms=grad_norms, forward_order=order[:len(order) // STEPS],
        pipeline_ranks=torch.distributed.get_process_group_ranks(
            parallel_state.get_pipeline_model_parallel_group()),
        overlap_p2p_comm=config.overlap_p2p_comm, batch_p2p_comm=config.batch_p2p_comm,
        microbatch_group_size_per_vp_stage=config.microbatch_group_size_per_vp_stage,
        overlap_p2p_comm_warmup_flush=config.overlap_p2p_comm_warmup_flush,
        shared_expert_overlap=shared_overlap)


def main(out_dir: str) -> None:
    for name, (parallel, overrides) in CASES.items():
        where = os.path.join(out_dir, name)
        with reporting(where):
            record = run(parallel, overrides)
        write_result(where, record)
    destroy()


if __name__ == "__main__":
    main(sys.argv[1])
