"""How a run computes and communicates: precision (fp32, bf16, FP8 through Transformer Engine),
activation recompute, and the overlap of communication with compute.

`PerformanceConfig` holds the choices (Megatron-LM's flags, declared on its fields) and turns
them into megatron-core's own fields (`TransformerConfig`, `DistributedDataParallelConfig`); none
of them changes the model's math beyond rounding. Checks come in three steps, each as early as it
can be: the values alone (on construction), against the parallel layout (`check_layout`), and
against this machine: GPU, Transformer Engine and the FP8 recipes it ships (`check_machine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from spannorm_megatron.config import ModelConfig, ParallelConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.options import check, option

FP8_FORMATS = ("hybrid", "e4m3")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
AMAX_COMPUTE_ALGOS = ("most_recent", "max")

FP8_RECIPES = {
    # --fp8-recipe: (Transformer Engine recipe class, lowest GPU compute capability), in
    # Megatron-LM's order
    "tensorwise": ("Float8CurrentScaling", (8, 9)),
    "delayed": ("DelayedScaling", (8, 9)),
    "mxfp8": ("MXFP8BlockScaling", (10, 0)),
    "blockwise": ("Float8BlockScaling", (9, 0)),
}
# Megatron-LM's custom recipe builds its quantizers from a Python module named by
# --fp8-quantizer-factory, which this stack does not take.
FP8_CHOICES = (*FP8_RECIPES, "custom")


@dataclass
class PerformanceConfig:
    """Precision, recompute and overlap choices of a run. Defaults: fp32, no recompute, no
    overlap (what runs everywhere, CPU included)."""

    bf16: bool = option(
        False, "Parameters and activations in bfloat16 (main weights and gradient reduction in "
        "fp32).")
    fp8_format: Optional[str] = option(
        None, "FP8 GEMMs through Transformer Engine: hybrid (E4M3 forward, E5M2 gradients) or "
        "e4m3; unset: no FP8. Needs --bf16, the Transformer Engine flavour and an FP8 GPU.",
        choices=FP8_FORMATS)
    fp8_recipe: str = option(
        "delayed", "How FP8 scales are chosen: delayed (amax history), tensorwise (current "
        "scaling), blockwise or mxfp8 (Blackwell), as far as the installed Transformer Engine "
        "has them (custom is refused).", choices=FP8_CHOICES)
    fp8_margin: int = option(0, "Power-of-two margin of the delayed-scaling factor.",
                             at_least=0)
    fp8_amax_history_len: int = option(1, "Steps of amax history the delayed recipe keeps.",
                                       at_least=1)
    fp8_amax_compute_algo: str = option(
        "most_recent", "Which amax of the history the delayed recipe uses.",
        choices=AMAX_COMPUTE_ALGOS)
    fp8_param_gather: bool = option(
        False, "Keep parameters in FP8 and all-gather them in FP8 (distributed optimizer).")
    first_last_layers_bf16: bool = option(
        False, "Run the first and last transformer layers in bf16 under FP8.")
    recompute_granularity: Optional[str] = option(
        None, "Activation recompute: selective (attention core) or full (whole layers); "
        "unset: off.", choices=RECOMPUTE_GRANULARITIES)
    recompute_method: Optional[str] = option(
        None, "With full recompute: uniform or block (unset: uniform).",
        choices=RECOMPUTE_METHODS)
    recompute_num_layers: Optional[int] = option(
        None, "With full recompute: layers per recompute chunk (uniform) or recomputed layers "
        "per stage (block); unset: 1.", at_least=1)
    overlap_grad_reduce: bool = option(
        False, "Reduce gradients bucket by bucket during the backward pass instead of after it.")
    overlap_param_gather: bool = option(
        False, "All-gather updated parameters during the next forward pass (distributed "
        "optimizer, with --overlap-grad-reduce).")
    tp_comm_overlap: bool = option(
        False, "Overlap tensor-parallel communication with GEMMs (Transformer Engine "
        "userbuffers, with --sequence-parallel).")
    ddp_bucket_size: Optional[int] = option(
        None, "Elements per gradient-reduction bucket; unset: megatron-core's default.",
        at_least=1)

    def __post_init__(self):
        check(self)
        if self.fp8_recipe == "custom":
            raise ConfigError("--fp8-recipe custom needs Megatron-LM's --fp8-quantizer-factory "
                              "(a Python module of quantizers), which this stack does not "
                              "take: use tensorwise, delayed, mxfp8 or blockwise.")
        if self.fp8_format is not None and not self.bf16:
            raise ConfigError("--fp8-format needs --bf16: FP8 runs the GEMMs in FP8 and "
                              "everything else in bf16.")
        for flag, value in (("--fp8-param-gather", self.fp8_param_gather),
                            ("--first-last-layers-bf16", self.first_last_layers_bf16)):
            if value and self.fp8_format is None:
                raise ConfigError(f"{flag} only applies to FP8 runs: add --fp8-format "
                                  f"hybrid (or e4m3), or drop it.")
        if self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            # megatron-core refuses it too, but only once the process groups exist.
            raise ConfigError("--first-last-layers-bf16 does not work with --fp8-recipe "
                              "delayed (its amax history spans all layers): use --fp8-recipe "
                              "tensorwise, or drop --first-last-layers-bf16.")
        if self.tp_comm_overlap and not self.bf16:
            raise ConfigError("--tp-comm-overlap needs --bf16: Transformer Engine's userbuffers "
                              "hold 2-byte elements.")
        if self.recompute_method is not None and self.recompute_granularity != "full":
            raise ConfigError("--recompute-method applies to --recompute-granularity full.")
        if self.recompute_num_layers is not None and self.recompute_granularity != "full":
            raise ConfigError("--recompute-num-layers applies to --recompute-granularity full.")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce (megatron-core "
                              "overlaps the gather only alongside the gradient reduction).")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def check_layout(self, parallel: ParallelConfig) -> None:
        """Refuse choices the parallel layout cannot carry out."""
        if self.overlap_param_gather and not parallel.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (only "
                              "the distributed optimizer gathers parameters).")
        if self.fp8_param_gather and not parallel.use_distributed_optimizer:
            raise ConfigError("--fp8-param-gather needs --use-distributed-optimizer.")
        if self.tp_comm_overlap and not (parallel.tensor_model_parallel_size > 1
                                         and parallel.sequence_parallel):
            raise ConfigError("--tp-comm-overlap needs --tensor-model-parallel-size > 1 and "
                              "--sequence-parallel.")

    def check_model(self, model: ModelConfig) -> None:
        """Refuse model options these precision and recompute choices contradict."""
        padding = [flag for flag, on in (
            ("--moe-router-padding-for-quantization", model.moe_router_padding_for_quantization),
            ("--moe-router-padding-for-fp8", model.moe_router_padding_for_fp8)) if on]
        if padding and self.fp8_format is None:
            raise ConfigError(f"{padding[0]} pads routed tokens for FP8 GEMMs, and this run has "
                              f"no FP8: add --fp8-format hybrid (or e4m3), or drop it.")
        if model.moe_layer_recompute and self.recompute_granularity == "full":
            raise ConfigError("--moe-layer-recompute is selective recompute of the MoE layers, "
                              "and --recompute-granularity full already recomputes whole "
                              "layers (megatron-core refuses both): drop one of them.")

    def check_machine(self, model: ModelConfig) -> None:
        """Refuse choices this machine cannot run: FP8 and TP overlap need Transformer Engine
        on a GPU (FP8: compute capability 8.9+, e.g. H100; mxfp8: 10.0+)."""
        from spannorm_megatron.model.specs import transformer_engine_available

        wants_te = [flag for flag, on in (
            ("--fp8-format", self.fp8_format is not None),
            ("--tp-comm-overlap", self.tp_comm_overlap),
            ("--transformer-impl transformer_engine", model.transformer_impl == "transformer_engine"),
        ) if on]
        if not wants_te:
            return
        if not transformer_engine_available():
            raise ConfigError(f"{' and '.join(wants_te)} need Transformer Engine on a GPU, and "
                              f"this machine lacks one of them: install the 'te' extra on a GPU "
                              f"host (docs/gpu.md), or drop {' and '.join(wants_te)}.")
        if model.transformer_impl == "local":
            raise ConfigError(f"{' and '.join(wants_te)} need the Transformer Engine layers: "
                              f"use --transformer-impl transformer_engine (or auto).")
        if self.fp8_format is None:
            return
        recipe_class, capability = FP8_RECIPES[self.fp8_recipe]
        found = _device_capability()
        if found < capability:
            raise ConfigError(
                f"--fp8-recipe {self.fp8_recipe} needs a GPU of compute capability "
                f"{capability[0]}.{capability[1]} or newer; this one is {found[0]}.{found[1]}.")
        from transformer_engine.common import recipe

        if not hasattr(recipe, recipe_class):
            raise ConfigError(f"--fp8-recipe {self.fp8_recipe} needs Transformer Engine's "
                              f"{recipe_class}, which the installed version lacks: upgrade "
                              f"Transformer Engine or choose another recipe.")

    def transformer_kwargs(self) -> dict:
        """`TransformerConfig` fields (precision, FP8, recompute, TP overlap)."""
        kwargs = dict(bf16=self.bf16, params_dtype=self.params_dtype,
                      tp_comm_overlap=self.tp_comm_overlap)
        if self.fp8_format is not None:
            kwargs.update(fp8=self.fp8_format, fp8_recipe=self.fp8_recipe,
                          fp8_margin=self.fp8_margin,
                          fp8_amax_history_len=self.fp8_amax_history_len,
                          fp8_amax_compute_algo=self.fp8_amax_compute_algo,
                          fp8_param=self.fp8_param_gather,
                          first_last_layers_bf16=self.first_last_layers_bf16)
        if self.recompute_granularity is not None:
            kwargs["recompute_granularity"] = self.recompute_granularity
        if self.recompute_granularity == "full":
            kwargs.update(recompute_method=self.recompute_method or "uniform",
                          recompute_num_layers=self.recompute_num_layers or 1)
        return kwargs

    def ddp_kwargs(self, parallel: ParallelConfig) -> dict:
        """`DistributedDataParallelConfig` fields."""
        kwargs = dict(use_distributed_optimizer=parallel.use_distributed_optimizer,
                      grad_reduce_in_fp32=self.bf16,
                      overlap_grad_reduce=self.overlap_grad_reduce,
                      overlap_param_gather=self.overlap_param_gather,
                      fp8_param_gather=self.fp8_param_gather)
        if self.ddp_bucket_size is not None:
            kwargs["bucket_size"] = self.ddp_bucket_size
        return kwargs


def initialize_tp_comm_overlap(performance: PerformanceConfig, *, seq_length: int,
                               micro_batch_size: int, hidden_size: int,
                               tensor_model_parallel_size: int) -> None:
    """Set up Transformer Engine's userbuffers for ``--tp-comm-overlap`` (after the process
    groups exist, before the model is built), sized as Megatron-LM sizes them: one sequence of
    micro-batch tokens by the hidden size. Nothing happens without the flag."""
    if not performance.tp_comm_overlap:
        return
    from transformer_engine.pytorch.module import base

    # TE 2.8+ takes the buffers' quantization modes (`use_fp8` is deprecated there): FP8 GEMMs
    # communicate in FP8, and the layers kept in bf16 under --first-last-layers-bf16 in bf16.
    modes = [base.UserBufferQuantizationMode.NONE]
    if performance.fp8_format is not None:
        modes = [base.UserBufferQuantizationMode.FP8] + (
            modes if performance.first_last_layers_bf16 else [])
    base.initialize_ub(shape=[seq_length * micro_batch_size, hidden_size],
                       tp_size=tensor_model_parallel_size, quantization_modes=modes,
                       dtype=performance.params_dtype)


def _device_capability() -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability())
