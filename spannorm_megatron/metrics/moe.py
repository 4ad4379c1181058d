"""MoE routing metrics: the load-balancing loss (megatron-core's tracker) and per-expert load.

Why: a collapsing router (a few experts take all tokens) shows first in the expert load and the
auxiliary loss, long before the LM loss; both are logged per layer.

- load-balancing loss: megatron-core's router adds `aux_loss / coeff` of every micro-batch to
  its layer-wise tracker (`get_moe_layer_wise_logging_tracker()`). `collect_losses()` (every
  iteration, as Megatron-LM) reduces it across ranks as megatron-core's
  `reduce_aux_losses_tracker_across_ranks` does (TP/CP sum, DP average, pipeline sum; see
  `reduce_router_losses` for why not that function), divides by the number of micro-batches,
  sums over layers, divides by the number of MoE layers and clears it, exactly as
  Megatron-LM's `track_moe_metrics` (its 0.16.1 signature: `track_moe_metrics(loss_scale,
  iteration, writer, ...)`) does -- we do not call that function because it writes to the
  TensorBoard itself from every rank it is given a writer on, and it allocates with
  `device="cuda"`; here the numbers come back to the caller, who hands them to the writer.
  The tracker accumulates on EVERY step, logged or not, so call `start_step()` every step
  (it only zeroes the tracker: no communication).
- expert load: forward hooks on each MoE layer's router (registered only while measuring)
  count the tokens each expert receives (the router's `routing_map` where the probability is
  not zero: padding to capacity marks slots with probability 0); summed over micro-batches
  and over the world (every token is routed on exactly one rank: sequence-parallel TP shards,
  DP/EP replicas and pipeline stages hold disjoint tokens or layers) and divided by the
  routed-token total, they give each expert's fraction of the layer's top-k assignments
  (1/num_experts each when perfectly balanced).
- dropped tokens (with --moe-expert-capacity-factor): per layer, 1 - kept assignments /
  (tokens x topk), from the same hooks.
- expert bias (--moe-router-enable-expert-bias): each MoE layer's bias after the step, from the
  ranks of its pipeline stage (TP/DP/EP replicas hold the same values).
- z-loss and the other router losses: megatron-core tracks z-loss without a reduce group, each
  rank the mean over its own tokens; `reduce_router_losses` averages it over the TP x DP ranks
  (what one process would compute). Ranks whose stage holds no MoE layer (dense layers from
  --moe-layer-freq) have no tracker entries of their own; they get zeroed entries so that every
  rank joins the same pipeline reductions in the same order, as Megatron-LM's
  `track_moe_metrics(force_initialize=True)` does.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils

from spannorm_megatron.metrics._model import (
    as_chunk_list,
    in_backward_pass,
    metrics_device,
    total_layers,
    transformer_layers,
    unwrap,
)


# megatron-core's tracker name of each load-balancing type's loss.
_BALANCING_LOSS = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}
# Tracked per rank over the rank's own tokens (no reduce group in megatron-core).
_RANK_LOCAL = ("z_loss",)


def router_loss_names(config) -> List[str]:
    """The router losses logged for this TransformerConfig, in a fixed order: Megatron-LM's
    `track_names` (training_log): one per load-balancing type, whatever its coefficient (a
    coefficient of 0 tracks nothing and logs 0), and `z_loss` when --moe-z-loss-coeff is set."""
    types = config.moe_router_load_balancing_type
    types = types if isinstance(types, list) else [types]
    names = [_BALANCING_LOSS[t] for t in _BALANCING_LOSS if t in types]
    if config.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def moe_layer_numbers(config) -> List[int]:
    """Global 1-based numbers of the MoE layers (megatron-core's moe_layer_freq)."""
    if not config.num_moe_experts:
        return []
    freq = config.moe_layer_freq
    pattern = ([1 if i % freq == 0 else 0 for i in range(config.num_layers)]
               if isinstance(freq, int) else list(freq))
    return [i + 1 for i, moe in enumerate(pattern) if moe]


def reduce_router_losses(config) -> List[str]:
    """Collective (every rank calls): reduce megatron-core's layer-wise router-loss tracker
    in place, the same way on every rank; returns the names reduced."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    names = router_loss_names(config)
    size = config.num_layers + int(config.mtp_num_layers or 0)
    for name in names:
        tracker.setdefault(name, {"values": torch.zeros(size, device=metrics_device()),
                                  "reduce_group": None, "avg_group": None,
                                  "reduce_group_has_dp": False})
    if torch.distributed.is_initialized():
        # megatron-core's reduce_aux_losses_tracker_across_ranks sums over the pipeline first
        # and averages over DP after, only on ranks whose entries carry a reduce group: ranks
        # of a stage without MoE layers would end with one DP rank's value. Here every stage
        # reduces within itself first (the groups megatron-core recorded), the pipeline last.
        dp = parallel_state.get_data_parallel_group(with_context_parallel=False,
                                                    partial_data_parallel=False)
        for name in names:
            entry = tracker[name]
            values = entry["values"]
            if name in _RANK_LOCAL:
                _average(values, parallel_state.get_tensor_and_data_parallel_group())
            elif entry.get("reduce_group") is not None:
                torch.distributed.all_reduce(values, group=entry["reduce_group"])
                if not entry.get("reduce_group_has_dp", False):
                    _average(values, dp)
            if entry.get("avg_group") is not None:
                _average(values, entry["avg_group"])
            torch.distributed.all_reduce(
                values, group=parallel_state.get_pipeline_model_parallel_group())
    return names


def _average(values: torch.Tensor, group) -> None:
    # SUM then divide: gloo has no AVG reduction.
    size = torch.distributed.get_world_size(group)
    if size > 1:
        torch.distributed.all_reduce(values, group=group)
        values /= size


class MoEMetrics:
    """Load-balancing loss and per-expert load per MoE layer of this rank's model chunks."""

    def __init__(self, model_chunks):
        self.chunks = as_chunk_list(model_chunks)
        self.num_layers = total_layers(self.chunks)
        self.config = unwrap(self.chunks[0]).config
        self.num_experts = int(self.config.num_moe_experts or 0)
        self.routers = [(number, layer.mlp.router) for number, layer in
                        transformer_layers(self.chunks) if hasattr(layer.mlp, "router")]
        self.moe_layers = moe_layer_numbers(self.config)
        self._device = metrics_device()
        self._handles: List = []
        self._counts = torch.zeros(self.num_layers, max(self.num_experts, 1),
                                   dtype=torch.float64, device=self._device)
        # Per layer: top-k assignments asked for (tokens x topk).
        self._wanted = torch.zeros(self.num_layers, dtype=torch.float64, device=self._device)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def enabled(self) -> bool:
        """Whether the router hooks are registered (only while measuring)."""
        return bool(self._handles)

    def start_step(self, measure: bool = True) -> None:
        """Every step: zero megatron-core's aux-loss tracker. `measure`: also count expert load.

        The tracker is process-global and sized by the first model that used it; entries of
        another size (a different model built earlier in this process) are dropped so that
        megatron-core recreates them for this model.
        """
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        size = self.num_layers + int(self.config.mtp_num_layers or 0)
        for name in [n for n, entry in tracker.items() if entry["values"].numel() != size]:
            del tracker[name]
        moe_utils.clear_aux_losses_tracker()
        self._counts.zero_()
        self._wanted.zero_()
        if measure and not self._handles:
            for number, router in self.routers:
                self._handles.append(router.register_forward_hook(self._hook(number - 1)))
        elif not measure:
            self.disable()

    def disable(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            if in_backward_pass():  # recompute in the backward pass: counted already
                return
            probs, routing_map = output
            kept = (routing_map & (probs != 0)).detach().reshape(-1, routing_map.shape[-1])
            self._counts[index] += kept.sum(dim=0).to(torch.float64)
            self._wanted[index] += kept.shape[0] * self.config.moe_router_topk
        return hook

    def collect_losses(self, num_microbatches: int) -> Dict[str, object]:
        """Collective (every rank calls; Megatron-LM does it every iteration). Returns, on every
        rank, for each router loss (`router_loss_names`):

        {'load_balancing_loss': sum over layers / number of MoE layers (Megatron-LM's value),
         'load_balancing_loss_per_layer': {layer: value} for every layer 1..L (the tracker's
         entries: 0 for dense layers)}

        each micro-batch's loss averaged over the step's micro-batches. Empty for a dense
        model. Clears megatron-core's tracker. One host sync: every loss in one tensor.
        """
        if not self.is_moe:
            return {}
        names, losses = self._router_losses(num_microbatches)
        return self._unpack_losses(names, losses.reshape(-1).cpu().tolist())

    def collect(self, num_microbatches: int) -> Dict[str, object]:
        """Collective (every rank calls). Returns, on every rank, `collect_losses()` and:

        {'expert_load': {layer: [fraction of the layer's routed tokens per expert]},
         'expert_bias': {layer: [bias per expert]} (with expert bias),
         'dropped_token_fraction' and '..._per_layer' (with a capacity factor)}
        for the MoE layers. Empty dict for a dense model. Clears the tracker and disables the
        hooks. Everything is reduced on the device and comes to the host in one packed tensor:
        one host sync per log step, whatever the number of layers.
        """
        if not self.is_moe:
            return {}
        names, losses = self._router_losses(num_microbatches)
        bias = self._expert_bias_tensor()
        measured = bool(self._handles)
        self.disable()
        load = self._reduced_load() if measured else None
        pieces = [losses.reshape(-1)] + [t.reshape(-1) for t in (bias, load) if t is not None]
        values = torch.cat(pieces).cpu().tolist()  # the one host sync
        L, E = self.num_layers, self.num_experts
        result = self._unpack_losses(names, values[:losses.numel()])
        offset = losses.numel()
        if bias is not None:
            result["expert_bias"] = {n: values[offset + (n - 1) * E:offset + n * E]
                                     for n in self.moe_layers}
            offset += L * E
        if load is not None:
            rows = [values[offset + i * (E + 1):offset + (i + 1) * (E + 1)] for i in range(L)]
            self._add_load(result, rows)
        self._counts.zero_()
        self._wanted.zero_()
        return result

    def _router_losses(self, num_microbatches: int):
        """Collective: (names, [names, layers] float64 tensor on the device) of the router
        losses reduced over ranks and averaged over micro-batches; clears the tracker."""
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        names = reduce_router_losses(self.config)
        size = self.num_layers + int(self.config.mtp_num_layers or 0)
        losses = (torch.stack([tracker[name]["values"].double() for name in names])
                  / num_microbatches if names
                  else torch.zeros(0, size, dtype=torch.float64, device=self._device))
        moe_utils.clear_aux_losses_tracker()
        return names, losses

    def _unpack_losses(self, names: List[str], flat: List[float]) -> Dict[str, object]:
        size = self.num_layers + int(self.config.mtp_num_layers or 0)
        moe_layers = self.moe_layers or list(range(1, self.num_layers + 1))
        result: Dict[str, object] = {}
        for index, name in enumerate(names):
            values = flat[index * size:(index + 1) * size]
            result[name] = sum(values) / (len(moe_layers) + int(self.config.mtp_num_layers or 0))
            result[f"{name}_per_layer"] = {n + 1: value for n, value in enumerate(values)}
        return result

    def _reduced_load(self) -> torch.Tensor:
        """Collective: [layers, experts + 1] on the device: each expert's kept assignments,
        then the assignments asked for, summed over the world in one all-reduce."""
        load = torch.cat([self._counts, self._wanted.unsqueeze(1)], dim=1)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(load)
            tp = parallel_state.get_tensor_model_parallel_world_size()
            if tp > 1 and not self.config.sequence_parallel:
                # TP ranks without sequence parallelism route the same tokens
                load /= tp
        return load

    def _add_load(self, result: Dict[str, object], rows: List[List[float]]) -> None:
        """Expert load and dropped tokens from `_reduced_load`'s rows, on the host."""
        load, dropped = {}, {}
        for i, row in enumerate(rows):
            counts, asked = row[:-1], row[-1]
            total = sum(counts)
            if total > 0:
                load[i + 1] = [c / total for c in counts]
            if asked > 0 and self.config.moe_expert_capacity_factor is not None:
                dropped[i + 1] = 1.0 - total / asked
        result["expert_load"] = load
        if dropped:
            result["dropped_token_fraction"] = sum(dropped.values()) / len(dropped)
            result["dropped_token_fraction_per_layer"] = dropped

    def _expert_bias_tensor(self) -> Optional[torch.Tensor]:
        """Collective: [layers, experts] of every MoE layer's expert bias on the device,
        gathered over the pipeline stages (None without expert bias)."""
        if not self.config.moe_router_enable_expert_bias:
            return None
        bias = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64,
                           device=self._device)
        for number, router in self.routers:
            bias[number - 1] = router.expert_bias.detach().to(torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(
                bias, group=parallel_state.get_pipeline_model_parallel_group())
        return bias

    def _expert_bias(self) -> Optional[Dict[int, List[float]]]:
        """Collective: every MoE layer's expert bias, gathered over the pipeline stages."""
        bias = self._expert_bias_tensor()
        if bias is None:
            return None
        rows = bias.cpu().tolist()
        return {n: rows[n - 1] for n in self.moe_layers}


def expert_imbalance(load: List[float]) -> Optional[float]:
    """max load / mean load of one layer (1.0 = perfectly balanced, num_experts = collapsed)."""
    if not load:
        return None
    mean = sum(load) / len(load)
    return max(load) / mean if mean > 0 else None
