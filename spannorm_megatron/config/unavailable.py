"""Megatron-LM flags that `spannorm-train` knows only to refuse, or to accept as no-ops.

Each is declared like every other flag (`spannorm_megatron.config.options`), so a Megatron-LM command
line or YAML that uses one gets an answer naming the reason instead of "unrecognized argument":

- refused when given: a feature whose machinery this stack does not have (the refusal says what
  it would need, and what to use instead);
- accepted as a no-op, with a notice at start (`args.notices`): a flag Megatron-LM core_v0.16.1
  itself ignores in training (declared there, read nowhere, or only by its inference engine).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List

from spannorm_megatron.config.options import check, flag_of, option
from spannorm_megatron.errors import ConfigError

_EP_OVERLAP = (
    "megatron-core runs it through its combined 1F1B schedule, which calls each layer's parts "
    "as separate callables (models/gpt/fine_grained_callables.py) instead of the layer's "
    "forward: the placement layers' equations would be bypassed, and this stack drives no "
    "such schedule. --moe-shared-expert-overlap overlaps the shared expert with the dispatch")


@dataclass
class Unavailable:
    """Megatron-LM flags refused here (with the reason), or ignored as Megatron-LM ignores them."""

    # ------------------------------------------------------------------ refused when given
    moe_use_upcycling: bool = option(
        False, "Not available here: Megatron-LM converts a dense checkpoint (--load) into this "
        "MoE model in its first step (megatron-core's upcycling_utils); spannorm-train has no "
        "such conversion step.")
    moe_upcycling_granularity: int = option(
        1, "Not available here (unless 1): it sets the expert width as a fraction of the "
        "dense FFN for --moe-use-upcycling, which is not available.", at_least=1)
    overlap_moe_expert_parallel_comm: bool = option(
        False, "Not available here: it overlaps the expert-parallel all-to-all with another "
        "micro-batch's compute, and " + _EP_OVERLAP + ".")
    delay_wgrad_compute: bool = option(
        False, "Not available here: it delays weight gradients for "
        "--overlap-moe-expert-parallel-comm (and needs Transformer Engine), which is not "
        "available.")
    ep_overlap_early_attn_memory_release: bool = option(
        False, "Not available here: it reorders attention's backward under "
        "--overlap-moe-expert-parallel-comm, which is not available.")
    defer_embedding_wgrad_compute: bool = option(
        False, "Not available here: megatron-core defers the output layer's weight gradient "
        "only with gradient accumulation fusion (APEX's fused_weight_gradient_mlp_cuda kernel, "
        "GPUs), and this stack has never run the deferral with it.")
    wgrad_deferral_limit: int = option(
        0, "Not available here (unless 0): it limits the micro-batches whose output-layer "
        "weight gradient --defer-embedding-wgrad-compute defers, which is not available.",
        at_least=0)

    # ------------------------------------------------------------------ accepted, no effect
    moe_extended_tp: bool = option(
        False, "No effect: megatron-core ignores it since 0.10; experts are split over "
        "tensor-parallel ranks by --expert-tensor-parallel-size.")
    moe_pad_experts_for_cuda_graph_inference: bool = option(
        False, "No effect: only megatron-core's CUDA-graph inference reads it, not training.")
    scatter_gather_tensors_in_pipeline: bool = option(
        True, "No effect: Megatron-LM core_v0.16.1 declares it and reads it nowhere (pipeline "
        "stages send whole tensors).", flag="--no-scatter-gather-tensors-in-pipeline",
        negative=True)

    def __post_init__(self) -> None:
        check(self)
        for field in fields(self):
            fix = _REFUSED.get(field.name)
            if fix and getattr(self, field.name) != field.default:
                raise ConfigError(f"{flag_of(field)} is not available in spannorm-train: "
                                  f"{_reason(field)} Fix: {fix}.")

    def notices(self) -> List[str]:
        """One line per no-op flag given, for the run's start."""
        return [f"{flag_of(field)} accepted with no effect: {_reason(field)}"
                for field in fields(self)
                if field.name in _NO_OPS and getattr(self, field.name) != field.default]


def _reason(field) -> str:
    """The declaration's doc without its "Not available here:" / "No effect:" lead."""
    return field.metadata["doc"].split(": ", 1)[1]


# Refused fields -> the fix a refusal names.
_REFUSED = {
    "moe_use_upcycling": "train the MoE model from scratch, or --load an MoE checkpoint",
    "moe_upcycling_granularity": "drop it",
    "overlap_moe_expert_parallel_comm": "drop it",
    "delay_wgrad_compute": "drop it",
    "ep_overlap_early_attn_memory_release": "drop it",
    "defer_embedding_wgrad_compute": "drop it",
    "wgrad_deferral_limit": "drop it",
}
_NO_OPS = ("moe_extended_tp", "moe_pad_experts_for_cuda_graph_inference",
           "scatter_gather_tensors_in_pipeline")
