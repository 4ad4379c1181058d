"""Per-layer training-stability signals: activation RMS, gradient norm and update size per layer.

Why: a normalization placement is judged by how signals behave with depth: SpanNorm's claim is
that the residual stream and the gradients stay bounded in every layer where PostNorm's
gradients vanish and PreNorm's stream grows. A global loss or grad norm hides that; these
numbers show it per layer, on the steps that log, for free on the others.

For every transformer layer, by global layer number (1-based, all pipeline stages together):

    output_rms     RMS of the layer's output (the residual stream after the layer)
    attention_rms  RMS of the attention branch output (what is added to the stream)
    mlp_rms        RMS of the MLP branch output (dense MLP or MoE layer incl. shared expert)
    grad_norm      L2 norm of the gradients of all the layer's parameters, as the optimizer
                   receives them (after the data-parallel reduction, before clipping; divided
                   by the loss scale when the optimizer is given)
    update_ratio   ||W_after - W_before|| / ||W_before|| over the layer's parameters for one
                   optimizer step (parameters as the model holds them)

and the same two parameter signals for the parts outside the layers (`parts` after `collect`):
the embedding (word and position embeddings) and the output layer. Their share of the global
gradient norm says how much of a clipped step the lower layers get: the grid measures it against
width and tied embeddings. With tied embeddings the output layer's weight is the embedding's,
so its gradient is counted under `embedding` and `output_layer` holds no parameter (0).

Usage on a logging step (every call is collective where noted; all ranks make the same calls):

    signals = StabilitySignals(model_chunks)     # once
    signals.start_step()                         # hooks on, sums reset
    losses = forward_backward(...)               # hooks accumulate over all micro-batches
    signals.before_optimizer_step(optimizer)     # gradient norms, weight snapshot
    optimizer.step()
    signals.after_optimizer_step()               # update norms, snapshot freed
    values = signals.collect()                   # collective; hooks off; every rank gets all
    signals.parts                                # {"embedding": {"grad_norm": ..}, ...} of it

Steps that do not log call nothing: no hook is registered, nothing is computed.

RMS over all tokens of the step: each hook adds sum(x^2) and numel(x) of its tensor; RMS is
sqrt(sum / count) after summing both over micro-batches and over the whole world. That is exact
under every layout: sequence-parallel shards (TP), context-parallel shards and data-parallel
replicas hold disjoint tokens, and where a tensor is replicated (TP without sequence
parallelism) every element is counted equally often in the sum and in the count, so the ratio
is unchanged. Pipeline stages hold disjoint layers. The branch outputs are taken before dropout
(with the linear bias and any `scale_mode='forward'` branch scale applied); tokens re-run by
activation recompute in the backward pass are not counted again.

Parameter norms count every element of every parameter exactly once in the world, then one
all-reduce sums: a parameter replicated over tensor-parallel ranks (norm gains, attribute
`tensor_model_parallel` unset) is counted on TP rank 0 (expert-TP rank 0 for expert params);
tensor-parallel shards are counted on every TP rank; expert params (`allreduce=False`) live on
one expert-parallel rank each; data-parallel replicas are counted on DP rank 0 (expert-DP rank
0 for experts). Exactness per layout:

- megatron DDP without the distributed optimizer: `param.main_grad` holds the full reduced
  gradient on every DP rank after `forward_backward` (finalize_model_grads) returns: exact.
- distributed optimizer: after the reduce-scatter only this rank's shard of each gradient
  bucket is valid, so each rank counts exactly the elements of its shard (the buffer's
  `param_index_map` and bucket offsets, as megatron-core's optimizer slices them); the shards
  partition the buffer, so the sum over ranks is exact. Weight snapshots are of the shard only,
  so the memory cost is 1/DP of the layer weights. With several distributed-optimizer instances
  only instance 0 counts.
- plain modules without DDP: `param.grad` is used, counted on DP rank 0.

The weight snapshot is one copy of this rank's owned weights, kept in host memory across
`optimizer.step()`: on a GPU it is copied out into pinned buffers allocated at the first
logging step and reused (the copies are queued on the current stream, before the optimizer's
kernels, so no sync is needed), and the update is computed slice by slice of at most
`SNAPSHOT_SLICE` elements, so that a logging step adds at most a few slices' worth of device
memory to a plain step's peak, whatever the model's size (a whole clone on the device would add
the size of the weights: an OOM risk at scale). On CPU, host memory is the device's: the copy
lives only from `before_optimizer_step` to `after_optimizer_step`. The benchmark's
`--log-step-memory` row measures what a logging step adds to a plain step's peak.
With `overlap_param_gather`, the all-gathered copies of other ranks' shards are not updated
yet after `optimizer.step()`; only the owned shard is read, so the ratio is still exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from megatron.core import parallel_state

from spannorm_megatron.metrics._model import (
    as_chunk_list,
    in_backward_pass,
    metrics_device,
    total_layers,
    transformer_layers,
    unwrap,
)
from spannorm_megatron.runtime import has_accelerator

ACTIVATION_SIGNALS = ("output_rms", "attention_rms", "mlp_rms")
PARAMETER_SIGNALS = ("grad_norm", "update_ratio")
SIGNALS = ACTIVATION_SIGNALS + PARAMETER_SIGNALS
SNAPSHOT_SLICE = 1 << 22
"""Elements of one parameter compared at a time after the optimizer step (16 MiB in fp32):
what bounds the device memory the update ratio needs."""
PARTS = ("embedding", "output_layer")
"""Parameter groups outside the transformer layers, measured with the layers' parameter signals
(their slots follow the L layers' in every buffer: L + PARTS.index(part))."""


@dataclass
class _OwnedPart:
    """The elements of one parameter this rank counts: flat [start, end) of `param`."""

    param: torch.nn.Parameter
    start: int
    end: int

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().reshape(-1)[self.start:self.end]


class StabilitySignals:
    """Per-layer activation RMS, gradient norm and update ratio of this rank's model chunks.

    Build it after the DDP wrapping (`setup_model_and_optimizer`): which gradient elements
    this rank owns is read from the DDP buffers once, here.

    Args:
        model_chunks: this rank's model chunks (megatron DDP-wrapped or plain GPTModels), one
            per virtual pipeline stage, or a single chunk.
        snapshot_device: where the weight snapshot for `update_ratio` is kept: host memory
            ('cpu', the default), or e.g. 'cuda' to keep a whole copy on the device (faster to
            take, at the cost of the weights' size in device memory on logging steps).
    """

    def __init__(self, model_chunks, snapshot_device: Optional[Union[str, torch.device]] = None):
        self.chunks = as_chunk_list(model_chunks)
        self.num_layers = total_layers(self.chunks)
        self.layers = transformer_layers(self.chunks)
        self.snapshot_device = torch.device(snapshot_device or "cpu")
        self._host_buffers: Dict[int, torch.Tensor] = {}
        """Pinned host buffers of the snapshot, one per owned part, reused across logging steps
        (only while the parameters are on an accelerator)."""
        self._device = metrics_device()
        self._owned = self._owned_parts()
        self._handles: List = []
        self.parts: Dict[str, Dict[str, float]] = {}
        """`grad_norm` and `update_ratio` of each of PARTS from the last `collect`."""
        self._reset()

    # ------------------------------------------------------------------ hooks
    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self) -> None:
        """Register the forward hooks (idempotent). Does not reset the sums."""
        if self._handles:
            return
        for number, layer in self.layers:
            index = number - 1
            scale = float(getattr(layer, "branch_scale", 1.0))
            self._handles.append(layer.register_forward_hook(self._hook(0, index, 1.0)))
            self._handles.append(
                layer.self_attention.register_forward_hook(self._hook(1, index, scale)))
            self._handles.append(layer.mlp.register_forward_hook(self._hook(2, index, scale)))

    def disable(self) -> None:
        """Remove the forward hooks: the forward pass pays nothing for this object."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, signal: int, index: int, scale: float):
        def hook(_module, _inputs, output):
            if in_backward_pass():  # activation recompute: these tokens were counted already
                return
            value = output
            bias = None
            if isinstance(output, (tuple, list)):
                # layer -> (hidden, context); attention / MLP -> (output, bias)
                value = output[0]
                bias = output[1] if signal > 0 and len(output) > 1 else None
            value = value.detach()
            if bias is not None:
                value = value + bias.detach()
            norm = torch.linalg.vector_norm(value, dtype=torch.float32).double()
            self._act_sq[signal, index] += norm.square() * (scale * scale)
            self._act_count[signal][index] += value.numel()
        return hook

    # ------------------------------------------------------------------ step protocol
    def start_step(self) -> None:
        """Begin measuring a step: reset the sums and enable the hooks."""
        self._reset()
        self.enable()

    def before_optimizer_step(self, optimizer=None, loss_scale: Optional[float] = None) -> None:
        """Gradient norms per layer and the weight snapshot; call after `forward_backward`.

        The gradients are unscaled by `loss_scale`, or by `optimizer.get_loss_scale()` when an
        optimizer is given (fp16 loss scaling; 1 for bf16/fp32).
        """
        if loss_scale is None:
            loss_scale = float(optimizer.get_loss_scale()) if optimizer is not None else 1.0
        inv_scale_sq = 1.0 / (loss_scale * loss_scale)
        grad_sq = torch.zeros(self.num_layers + len(PARTS), dtype=torch.float64,
                              device=self._device)
        weight_sq = torch.zeros_like(grad_sq)
        snapshot = []
        with torch.no_grad():
            for index, parts in self._owned.items():
                for part in parts:
                    grad = getattr(part.param, "main_grad", None)
                    if grad is None:
                        grad = part.param.grad
                    if grad is not None:
                        grad_sq[index] += _sq_norm(part.flat(grad)).to(self._device) * inv_scale_sq
                    weights = part.flat(part.param)
                    weight_sq[index] += _sq_norm(weights).to(self._device)
                    snapshot.append((index, part, self._snapshot_of(len(snapshot), weights)))
        self._grad_sq, self._weight_sq, self._snapshot = grad_sq, weight_sq, snapshot

    def _snapshot_of(self, slot: int, weights: torch.Tensor) -> torch.Tensor:
        """A copy of `weights` on `snapshot_device`: into a reused pinned host buffer on a GPU
        machine (an asynchronous copy), else a fresh one (on CPU, host memory is the device's:
        nothing is gained by keeping it between logging steps)."""
        if self.snapshot_device.type != "cpu" or not has_accelerator():
            return weights.to(self.snapshot_device, copy=True)
        buffer = self._host_buffers.get(slot)
        if buffer is None or buffer.shape != weights.shape or buffer.dtype != weights.dtype:
            buffer = torch.empty(weights.shape, dtype=weights.dtype, device="cpu",
                                 pin_memory=True)
            self._host_buffers[slot] = buffer
        return buffer.copy_(weights, non_blocking=True)

    def after_optimizer_step(self) -> None:
        """Update norms per layer against the snapshot, which is then freed."""
        if self._snapshot is None:
            raise RuntimeError("after_optimizer_step() needs before_optimizer_step() first.")
        update_sq = torch.zeros(self.num_layers + len(PARTS), dtype=torch.float64,
                                device=self._device)
        with torch.no_grad():
            for index, part, before in self._snapshot:
                after = part.flat(part.param)
                for start in range(0, after.numel(), SNAPSHOT_SLICE):
                    now = after[start:start + SNAPSHOT_SLICE]
                    then = before[start:start + SNAPSHOT_SLICE].to(now.device, non_blocking=True)
                    update_sq[index] += _sq_norm(now.float() - then.float()).to(self._device)
        self._update_sq = update_sq
        self._snapshot = None

    def collect(self) -> Dict[str, Dict[int, float]]:
        """Reduce over all ranks (collective: every rank calls) and return the signals.

        Returns {signal: {global layer number: value}} for every signal measured this step
        (activation signals if the hooks ran, grad_norm after before_optimizer_step,
        update_ratio after after_optimizer_step), for ALL layers of the model on EVERY rank.
        Disables the hooks; the next measurement starts with start_step(). The parts outside
        the layers go to `self.parts`.
        """
        self.disable()
        L = self.num_layers
        P = L + len(PARTS)  # parameter slots: the layers, then the parts
        have_grad = self._grad_sq is not None
        have_update = self._update_sq is not None
        zeros = torch.zeros(P, dtype=torch.float64, device=self._device)
        packed = torch.cat([
            self._act_sq.reshape(-1),
            torch.tensor(self._act_count, dtype=torch.float64, device=self._device).reshape(-1),
            self._grad_sq if have_grad else zeros,
            self._weight_sq if self._weight_sq is not None else zeros,
            self._update_sq if have_update else zeros,
        ])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(packed)
        values = packed.cpu().tolist()
        act_sq = values[:3 * L]
        act_count = values[3 * L:6 * L]
        grad_sq, weight_sq, update_sq = (values[6 * L:6 * L + P], values[6 * L + P:6 * L + 2 * P],
                                         values[6 * L + 2 * P:6 * L + 3 * P])

        def update_ratio(i: int) -> float:
            return math.sqrt(update_sq[i]) / math.sqrt(weight_sq[i]) if weight_sq[i] > 0 else 0.0

        result: Dict[str, Dict[int, float]] = {}
        for s, name in enumerate(ACTIVATION_SIGNALS):
            per_layer = {}
            for i in range(L):
                count = act_count[s * L + i]
                if count > 0:
                    per_layer[i + 1] = math.sqrt(act_sq[s * L + i] / count)
            if per_layer:
                result[name] = per_layer
        if have_grad:
            result["grad_norm"] = {i + 1: math.sqrt(grad_sq[i]) for i in range(L)}
        if have_update:
            result["update_ratio"] = {i + 1: update_ratio(i) for i in range(L)}
        self.parts = {}
        for slot, part in enumerate(PARTS, start=L):
            values = {}
            if have_grad:
                values["grad_norm"] = math.sqrt(grad_sq[slot])
            if have_update:
                values["update_ratio"] = update_ratio(slot)
            if values:
                self.parts[part] = values
        self._reset()
        return result

    # ------------------------------------------------------------------ internals
    def _reset(self) -> None:
        L = self.num_layers
        self._act_sq = torch.zeros(3, L, dtype=torch.float64, device=self._device)
        self._act_count = [[0] * L for _ in range(3)]
        self._grad_sq = self._weight_sq = self._update_sq = None
        self._snapshot = None

    def _owned_parts(self) -> Dict[int, List[_OwnedPart]]:
        """For each parameter slot (layer index 0-based and global, then PARTS), the parameter
        elements this rank counts."""
        located = {}
        for chunk in self.chunks:
            located.update(_buffer_locations(chunk))
        groups = [(number - 1, layer) for number, layer in self.layers]
        for chunk in self.chunks:
            model = unwrap(chunk)
            if getattr(model, "pre_process", False):
                groups.append((self.num_layers + PARTS.index("embedding"), model.embedding))
            if getattr(model, "post_process", False):
                groups.append((self.num_layers + PARTS.index("output_layer"), model.output_layer))
        output_slot = self.num_layers + PARTS.index("output_layer")
        owned: Dict[int, List[_OwnedPart]] = {}
        for slot, module in groups:
            parts = owned.setdefault(slot, [])
            for param in module.parameters():
                # A tied output layer on the last pipeline stage holds a copy of the word
                # embeddings whose gradient is the embedding's: counted there only.
                tied_copy = slot == output_slot and getattr(param, "shared_embedding", False)
                if not param.requires_grad or tied_copy:
                    continue
                span = _owned_span(param, located.get(param))
                if span is not None:
                    parts.append(_OwnedPart(param, *span))
        return owned


def summarize(signals: Dict[str, Dict[int, float]]) -> Dict[str, float]:
    """One number per signal: the maximum over layers (the layer that blows up first)."""
    return {name: max(per_layer.values()) for name, per_layer in signals.items() if per_layer}


def _sq_norm(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=tensor.device)
    return torch.linalg.vector_norm(tensor, dtype=torch.float32).double().square()


def _buffer_locations(chunk) -> Dict[torch.nn.Parameter, tuple]:
    """param -> (buffer, bucket, use_distributed_optimizer, instances) for a megatron DDP chunk."""
    ddp_config = getattr(chunk, "ddp_config", None)
    if ddp_config is None:
        # A plain module: its `buffers` is nn.Module's method, not megatron's gradient buffers.
        return {}
    buffers = list(chunk.buffers or []) + list(
        getattr(chunk, "expert_parallel_buffers", None) or [])
    if not buffers:
        return {}
    distopt = bool(ddp_config.use_distributed_optimizer)
    instances = int(getattr(ddp_config, "num_distributed_optimizer_instances", 1) or 1)
    located = {}
    for buffer in buffers:
        for param, bucket in buffer.param_to_bucket.items():
            located[param] = (buffer, bucket, distopt, instances)
    return located


def _owned_span(param: torch.nn.Parameter, location) -> Optional[tuple]:
    """Flat [start, end) of `param` that this rank counts, or None (see the module doc)."""
    is_expert = not getattr(param, "allreduce", True)
    if not getattr(param, "tensor_model_parallel", False):
        tp_rank = (parallel_state.get_expert_tensor_parallel_rank() if is_expert
                   else parallel_state.get_tensor_model_parallel_rank())
        if tp_rank != 0:
            return None
    numel = param.numel()
    if location is None:  # no DDP buffer: plain module, full gradient on every DP replica
        dp_rank = (parallel_state.get_expert_data_parallel_rank() if is_expert
                   else parallel_state.get_data_parallel_rank(with_context_parallel=True))
        return (0, numel) if dp_rank == 0 else None

    buffer, bucket, distopt, instances = location
    dp_rank = buffer.data_parallel_group.rank()
    if not distopt:
        return (0, numel) if dp_rank == 0 else None
    if instances > 1:
        inter = parallel_state.get_inter_distributed_optimizer_instance_group()
        if inter.rank() != 0:
            return None
    start, end, _bucket_id = buffer.param_index_map[param]
    shard = bucket.grad_data.numel() // buffer.data_parallel_world_size
    shard_start = bucket.offset + dp_rank * shard
    lo, hi = max(start, shard_start), min(end, shard_start + shard)
    if lo >= hi:
        return None
    return (lo - start, hi - start)


__all__ = ["PARTS", "SIGNALS", "StabilitySignals", "summarize"]
