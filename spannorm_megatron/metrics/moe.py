"""MoE routing metrics: the load-balancing loss (megatron-core's tracker) and per-expert load.

Why: a collapsing router (a few experts take all tokens) shows first in the expert load and the
auxiliary loss, long before the LM loss; both are logged per layer.

- load-balancing loss: megatron-core's router adds `aux_loss / coeff` of every micro-batch to
  its layer-wise tracker (`get_moe_layer_wise_logging_tracker()`). `collect()` reduces it
  across ranks with megatron-core's own `reduce_aux_losses_tracker_across_ranks` (pipeline
  sum, TP/CP sum, DP average), divides by the number of micro-batches and clears it, exactly as
  Megatron-LM's `track_moe_metrics` (its 0.16.1 signature: `track_moe_metrics(loss_scale,
  iteration, writer, ...)`) does -- we do not call that function because it writes to the
  TensorBoard itself from every rank it is given a writer on, and it allocates with
  `device="cuda"`; here the numbers come back to the caller, who hands them to the writer.
  The tracker accumulates on EVERY step, logged or not, so call `start_step()` every step
  (it only zeroes the tracker: no communication).
- expert load: forward hooks on each MoE layer's router (registered only while measuring)
  count the tokens each expert receives (the router's `routing_map`); summed over micro-batches
  and over the world (every token is routed on exactly one rank: sequence-parallel TP shards,
  DP/EP replicas and pipeline stages hold disjoint tokens or layers) and divided by the
  routed-token total, they give each expert's fraction of the layer's top-k assignments
  (1/num_experts each when perfectly balanced).
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


class MoEMetrics:
    """Load-balancing loss and per-expert load per MoE layer of this rank's model chunks."""

    def __init__(self, model_chunks):
        self.chunks = as_chunk_list(model_chunks)
        self.num_layers = total_layers(self.chunks)
        self.config = unwrap(self.chunks[0]).config
        self.num_experts = int(self.config.num_moe_experts or 0)
        self.routers = [(number, layer.mlp.router) for number, layer in
                        transformer_layers(self.chunks) if hasattr(layer.mlp, "router")]
        self._device = metrics_device()
        self._handles: List = []
        self._counts = torch.zeros(self.num_layers, max(self.num_experts, 1),
                                   dtype=torch.float64, device=self._device)

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
            _probs, routing_map = output
            counts = routing_map.detach().reshape(-1, routing_map.shape[-1]).sum(dim=0)
            self._counts[index] += counts.to(torch.float64)
        return hook

    def collect(self, num_microbatches: int) -> Dict[str, object]:
        """Collective (every rank calls). Returns, on every rank:

        {'load_balancing_loss': mean over MoE layers (float),
         'load_balancing_loss_per_layer': {layer: value},
         'expert_load': {layer: [fraction of the layer's routed tokens per expert]}}
        plus the same two entries for any other loss in megatron-core's tracker (e.g. z_loss).
        Empty dict for a dense model. Clears the tracker and disables the hooks.
        """
        if not self.is_moe:
            return {}
        result: Dict[str, object] = {}
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if tracker:
            moe_utils.reduce_aux_losses_tracker_across_ranks()
            # Every layer of our GPT is MoE when num_experts is set (ModelConfig has no layer
            # frequency); the tracker has one slot per layer of the whole model.
            moe_layers = self.num_layers
            for name in sorted(tracker):
                values = (tracker[name]["values"].double() / num_microbatches).cpu().tolist()
                result[name] = sum(values) / moe_layers
                result[f"{name}_per_layer"] = {i + 1: v for i, v in enumerate(values)}
            moe_utils.clear_aux_losses_tracker()
        measured = bool(self._handles)
        self.disable()
        if measured:
            counts = self._counts.clone()
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(counts)
                tp = parallel_state.get_tensor_model_parallel_world_size()
                if tp > 1 and not self.config.sequence_parallel:
                    counts /= tp  # TP ranks without sequence parallelism route the same tokens
            load = {}
            for i, row in enumerate(counts.cpu().tolist()):
                total = sum(row)
                if total > 0:
                    load[i + 1] = [c / total for c in row]
            result["expert_load"] = load
        self._counts.zero_()
        return result


def expert_imbalance(load: List[float]) -> Optional[float]:
    """max load / mean load of one layer (1.0 = perfectly balanced, num_experts = collapsed)."""
    if not load:
        return None
    mean = sum(load) / len(load)
    return max(load) / mean if mean > 0 else None
