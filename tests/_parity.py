"""Parallel-parity harness: train the same model from the same weights on the same global batch
under one layout, and record what the parity tests compare.

Used twice: in the pytest process (a world of one: the reference) and in
`tests/_parity_worker.py` under `torchrun` (every 4-rank layout in LAYOUTS). Initial and final
weights travel as megatron-core dist checkpoints, whose resharding is itself megatron-core's:
the reference saves the initial weights once, every layout loads them into its own shards, and
each layout's final weights are loaded back into a single-process model for comparison.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer.moe import moe_utils

from _training import StepHooks
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.metrics.moe import MoEMetrics, reduce_router_losses
from spannorm_megatron.placements import PLACEMENTS
from spannorm_megatron.training.loop import train_step
from spannorm_megatron.training.setup import setup_model_and_optimizer

SEQ = 16
MICRO_BATCH = 2
GLOBAL_BATCH = 8
STEPS = 3
SIGMA = 0.05

COMBOS = {  # name -> (placement, moe)
    f"{placement}-{'moe' if moe else 'dense'}": (placement, moe)
    for placement in sorted(PLACEMENTS)
    for moe in (False, True)
}

LAYOUTS = {  # all fit 4 ranks; data parallelism fills what the named sizes leave
    "tp2_sp_pp2": ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 sequence_parallel=True),
    "tp2_dp2": ParallelConfig(tensor_model_parallel_size=2),  # dense only: MoE needs SP with TP
    "tp2_sp_dp2_ep2": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                     expert_model_parallel_size=2, expert_tensor_parallel_size=1),
    "tp2_sp_ep2_etp2": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                      expert_model_parallel_size=2),
    "dp4_ep2_distopt": ParallelConfig(expert_model_parallel_size=2,
                                      use_distributed_optimizer=True),
    "pp2_dp2_distopt": ParallelConfig(pipeline_model_parallel_size=2,
                                      use_distributed_optimizer=True),
    "pp2_vpp2_dp2": ParallelConfig(pipeline_model_parallel_size=2,
                                   virtual_pipeline_model_parallel_size=2),
}


# Megatron-LM recipes on the SpanNorm MoE model: a dense first layer, q/k norms,
# DeepSeek-V3-like routing (sigmoid scores, aux-loss-free expert bias, group-limited top-k,
# scaled probabilities), sequence aux loss and z-loss.
_ROUTING = dict(
    moe_layer_freq="([0]*1+[1]*3)", qk_layernorm=True, moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-2,
    moe_router_num_groups=2, moe_router_group_topk=1, moe_router_topk_scaling_factor=2.0,
    moe_router_load_balancing_type="seq_aux_loss", moe_z_loss_coeff=1e-3,
    moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True,
)
RECIPES = {  # name -> (placement, moe, ModelConfig overrides)
    # Capacity 1.0 drops tokens. megatron-core drops among the tokens a rank routes, which are
    # the single process's micro-batch wherever the sequence is whole (EP, DP, PP).
    "spannorm-moe-recipe-capacity": ("spannorm", True, dict(
        _ROUTING, moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs")),
    # With sequence parallelism each TP rank routes its slice of the sequence against its own
    # capacity, so a binding capacity legitimately drops other tokens than one process does;
    # 2.0 (capacity = every local token) exercises the capacity path without dropping.
    "spannorm-moe-recipe-sp": ("spannorm", True, dict(
        _ROUTING, moe_expert_capacity_factor=2.0, moe_token_drop_policy="position")),
}

RECIPE_LAYOUTS = {  # name -> (layout, recipe)
    "recipe_dp4_ep2": (ParallelConfig(expert_model_parallel_size=2),
                       "spannorm-moe-recipe-capacity"),
    "recipe_tp2_sp_ep2_etp2": (ParallelConfig(tensor_model_parallel_size=2,
                                              sequence_parallel=True,
                                              expert_model_parallel_size=2),
                               "spannorm-moe-recipe-sp"),
    "recipe_tp2_sp_dp2_ep2": (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                             expert_model_parallel_size=2,
                                             expert_tensor_parallel_size=1),
                              "spannorm-moe-recipe-sp"),
    # Uneven: 1 (dense) layer on the first stage, 3 MoE layers on the last.
    "recipe_pp2_uneven_dp2_ep2": (ParallelConfig(pipeline_model_parallel_size=2,
                                                 expert_model_parallel_size=2,
                                                 decoder_first_pipeline_num_layers=1),
                                  "spannorm-moe-recipe-capacity"),
    # Megatron-LM's explicit layout: the embedding and 3 layers (the dense one first) on stage 0,
    # the last MoE layer and the loss on stage 1.
    "recipe_pp2_layout_dp2_ep2": (ParallelConfig(pipeline_model_parallel_size=2,
                                                 expert_model_parallel_size=2,
                                                 pipeline_model_parallel_layout="Ettt|tL"),
                                  "spannorm-moe-recipe-capacity"),
    # One layer per model chunk: the dense layer alone in stage 0's first chunk.
    "recipe_pp2_vpp2_dp2": (ParallelConfig(pipeline_model_parallel_size=2,
                                           virtual_pipeline_model_parallel_size=2),
                            "spannorm-moe-recipe-capacity"),
}


def model_of(combo: str):
    """(placement, moe, overrides) of a COMBOS or RECIPES name."""
    if combo in RECIPES:
        return RECIPES[combo]
    placement, moe = COMBOS[combo]
    return placement, moe, {}


def applies(layout: ParallelConfig, moe: bool) -> bool:
    if moe:
        return layout.tensor_model_parallel_size == 1 or layout.sequence_parallel
    return layout.expert_model_parallel_size == 1


def model_config(placement: str, moe: bool, **overrides) -> ModelConfig:
    values = dict(
        norm_placement=placement, num_layers=4, hidden_size=64, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=128, vocab_size=128, max_sequence_length=SEQ,
        init_method_std=SIGMA,
        num_experts=4 if moe else None, moe_router_topk=2, moe_ffn_hidden_size=64,
        moe_aux_loss_coeff=1e-2,
    )
    return ModelConfig.recommended(**{**values, **overrides})


def global_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2024)
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ + 1), generator=generator)


def _micro_batches(tokens: torch.Tensor) -> List[dict]:
    """This data-parallel rank's micro-batches, assigned as Megatron-LM's sampler does: in each
    round of dp x micro-batch samples, rank r takes the r-th micro-batch."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    batches = []
    for start in range(rank * MICRO_BATCH, GLOBAL_BATCH, dp * MICRO_BATCH):
        sample = tokens[start:start + MICRO_BATCH]
        batches.append({
            "tokens": sample[:, :-1],
            "labels": sample[:, 1:],
            "loss_mask": torch.ones(MICRO_BATCH, SEQ),
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
        })
    return batches


def global_name(chunk, name: str) -> str:
    """`decoder.layers.<local>.x` -> `decoder.layers.<global>.x` (pipeline stages renumber)."""
    module = chunk.module
    if name.startswith("decoder.layers."):
        local, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{module.decoder.layers[int(local)].layer_number - 1}.{rest}"
    return name


def output_projection_std(chunks) -> float:
    weights = [p.detach().flatten() for chunk in chunks for n, p in chunk.named_parameters()
               if n.endswith("linear_proj.weight") or n.endswith("linear_fc2.weight")]
    return torch.cat(weights).std().item()


class _RouterCounter:
    """Tokens each expert of each layer receives, summed over every rank of the world."""

    def __init__(self, chunks, num_layers: int, num_experts: int):
        self.counts = torch.zeros(num_layers, num_experts)
        self.handles = []
        for chunk in chunks:
            for layer in chunk.module.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is not None:
                    self.handles.append(router.register_forward_hook(self._hook(layer.layer_number)))

    def _hook(self, layer_number: int):
        def hook(_module, _inputs, output):
            _probs, routing_map = output
            self.counts[layer_number - 1] += routing_map.sum(dim=0).float().detach()
        return hook

    def total(self) -> List[List[float]]:
        for handle in self.handles:
            handle.remove()
        # Each token is routed on exactly one rank (sequence parallel shards it over TP).
        torch.distributed.all_reduce(self.counts)
        return self.counts.tolist()


def _expert_biases(chunks) -> Dict[str, List[float]]:
    """This rank's routers' expert biases by global layer number (updated after each step)."""
    return {str(layer.layer_number): layer.mlp.router.expert_bias.tolist()
            for chunk in chunks for layer in chunk.module.decoder.layers
            if getattr(getattr(layer.mlp, "router", None), "expert_bias", None) is not None}


def _sharded_state(chunks) -> dict:
    return {f"chunk{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(chunks)}


def run(placement: str, moe: bool, parallel: ParallelConfig, init_dir: str, final_dir: str,
        overrides: Optional[dict] = None) -> Dict:
    """Load the initial weights, train STEPS steps, save the final weights; return the record.

    The caller has initialized megatron-core for `parallel` (spannorm_megatron.process).
    """
    config = model_config(placement, moe, **(overrides or {}))
    chunks, optimizer = setup_model_and_optimizer(
        config, parallel,
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, clip_grad=1.0))
    record = {"fresh_output_projection_std": output_projection_std(chunks)}

    # All chunks in one load: megatron-core checks that the ranks together read every shard.
    loaded = dist_checkpointing.load(_sharded_state(chunks), init_dir)
    for i, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded[f"chunk{i}"])
    optimizer.reload_model_params()

    batches = _micro_batches(global_batch())
    # The tracker is process-global and only zeroes its entries: a model run earlier in this
    # process (another test module, another recipe) would leave its loss names behind.
    moe_utils.get_moe_layer_wise_logging_tracker().clear()
    counter = _RouterCounter(chunks, config.num_layers, config.num_experts) if moe else None
    def first_step_gradients(optimizer):
        """Step 0, between backward and the update: the norm gains' gradients, the routing."""
        if not parallel.use_distributed_optimizer:  # its grads are sharded after reduce
            record["norm_grads"] = {
                global_name(chunk, n): p.main_grad.tolist()
                for chunk in chunks for n, p in chunk.module.named_parameters() if "norm" in n
            }
        if moe:
            record["tokens_per_expert"] = counter.total()
            # spannorm_megatron.metrics' reduction (the one TensorBoard logs): z-loss
            # averaged over TP x DP, stages without MoE layers joining with zeros.
            reduce_router_losses(chunks[0].module.config)
            # Every loss the routers log: load_balancing_loss, seq_load_balancing_loss,
            # z_loss (megatron-core's names), per layer.
            record["router_losses_per_layer"] = {
                name: (entry["values"] / len(batches)).tolist()
                for name, entry in moe_utils.get_moe_layer_wise_logging_tracker().items()}

    losses, grad_norms = [], []
    for step in range(STEPS):
        result = train_step(chunks, optimizer, None, iter(batches), len(batches), SEQ,
                            MICRO_BATCH, GLOBAL_BATCH,
                            monitor=StepHooks(first_step_gradients if step == 0 else None))
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
        if config.moe_router_enable_expert_bias:
            record.setdefault("expert_bias", []).append(_expert_biases(chunks))
    record.update(losses=losses, grad_norms=grad_norms)
    if config.moe_router_enable_expert_bias:
        # What TensorBoard gets: every MoE layer's bias, gathered over the pipeline stages.
        record["logged_expert_bias"] = MoEMetrics(chunks)._expert_bias()

    os.makedirs(final_dir, exist_ok=True)
    dist_checkpointing.save(_sharded_state(chunks), final_dir)
    return record


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def is_close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol)
