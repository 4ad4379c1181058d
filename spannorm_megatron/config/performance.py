"""How a run computes and communicates: precision (fp32, bf16, fp16 with loss scaling, FP8
through Transformer Engine), fused kernels, the attention backend, activation recompute, and the
overlap of communication with compute.

`PerformanceConfig` holds the choices (Megatron-LM's flags, declared on its fields) and turns
them into megatron-core's own fields (`TransformerConfig`, `DistributedDataParallelConfig`); none
of them changes the model's math beyond rounding. Checks come in three steps, each as early as it
can be: the values alone (on construction), against the parallel layout (`check_layout`), and
against this machine: GPU, Transformer Engine and the FP8 recipes it ships (`check_machine`).

Fusions are Megatron-LM's switches with its defaults (on): a `--no-*-fusion` flag forbids a
fused kernel, and the model builder uses each allowed one where its kernel can run
(`spannorm_megatron.model.fusions`), so a CPU run of a GPU script computes the same model
unfused.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.options import check, megatron_kwargs, option
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: --help and flag checks go without it
    import torch

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

# megatron-core's AttnBackend names (--attention-backend): flash, fused and unfused pick one of
# Transformer Engine's attention kernels; local is megatron-core's own PyTorch attention; auto
# lets Transformer Engine choose (and is the local attention on the local layers).
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")
TE_ATTENTION_BACKENDS = ("flash", "fused", "unfused")
CROSS_ENTROPY_FUSION_IMPLS = ("native", "te")


NVTE_ATTENTION_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
NVTE_BY_ATTENTION_BACKEND = {"local": (0, 0, 0), "flash": (1, 0, 0), "fused": (0, 1, 0),
                             "unfused": (0, 0, 1), "auto": (1, 1, 1)}
"""What megatron-core 0.16.1 sets each of `NVTE_ATTENTION_VARIABLES` to, per backend."""

# The declarations of fields megatron-core's TransformerConfig takes (`options.megatron_kwargs`)
# only in FP8 runs, and only with full recompute (with its defaults filled in). FP8 and recompute
# are left out when unset, so that TransformerConfig overrides (`setup_model_and_optimizer`'s)
# may still set them.
_FP8 = dict(megatron=True, megatron_if="is_fp8")
_FULL_RECOMPUTE = dict(megatron=True, megatron_if="full_recompute")


@dataclass
class PerformanceConfig:
    """Precision, fusion, recompute and overlap choices of a run. Defaults: fp32, every fusion
    allowed (used where it can run), no recompute, no overlap."""

    bf16: bool = option(
        False, "Parameters and activations in bfloat16 (main weights and, unless "
        "--grad-reduce-in-bf16, gradient accumulation and reduction in fp32).", megatron=True)
    fp16: bool = option(
        False, "Parameters and activations in float16 with fp32 main weights and loss scaling: "
        "dynamic (--initial-loss-scale, --min-loss-scale, --loss-scale-window, --hysteresis) "
        "unless --loss-scale sets a constant one.", megatron=True)
    loss_scale: Optional[float] = option(
        None, "Constant loss scale (powers of 2 work best) for --fp16, or --bf16 / the "
        "distributed optimizer; unset: dynamic loss scaling under --fp16, none otherwise.",
        above=0.0)
    initial_loss_scale: float = option(
        2**32, "Dynamic loss scaling: the scale it starts from.", above=0.0)
    min_loss_scale: float = option(
        1.0, "Dynamic loss scaling: the lowest scale it backs off to.", above=0.0)
    loss_scale_window: float = option(
        1000, "Dynamic loss scaling: steps without overflow after which the scale doubles.",
        above=0.0)
    hysteresis: int = option(
        2, "Dynamic loss scaling: overflowing steps tolerated before the scale halves.",
        at_least=1)
    accumulate_allreduce_grads_in_fp32: bool = option(
        False, "Accumulate and all-reduce gradients in fp32 (always so under --bf16 unless "
        "--grad-reduce-in-bf16; fp16 runs reduce in fp16 without it).")
    grad_reduce_in_bf16: bool = option(
        False, "Under --bf16: accumulate and reduce gradients in bfloat16 instead of fp32.")
    attention_softmax_in_fp32: bool = option(
        False, "Run the attention's masking and softmax in fp32 under --fp16/--bf16 (megatron-"
        "core's local attention; Transformer Engine's kernels keep their own).", megatron=True)
    attention_backend: str = option(
        "auto", "Attention kernel: flash, fused or unfused (Transformer Engine's, which need it "
        "on a GPU), local (megatron-core's PyTorch attention, with --transformer-impl local), "
        "or auto (Transformer Engine chooses; the local attention on the local layers).",
        choices=ATTENTION_BACKENDS, megatron=True)
    masked_softmax_fusion: bool = option(
        True, "Allow the fused scale+mask+softmax kernel (megatron-core's local attention with "
        "its CUDA extension; Transformer Engine's attention fuses it itself) "
        "(--no-masked-softmax-fusion forbids it).", flag="--no-masked-softmax-fusion",
        negative=True)
    bias_gelu_fusion: bool = option(
        True, "Allow the fused bias+GeLU kernel (--no-bias-gelu-fusion forbids it).",
        flag="--no-bias-gelu-fusion", negative=True)
    bias_swiglu_fusion: bool = option(
        True, "Allow the fused bias+SwiGLU kernel (--no-bias-swiglu-fusion forbids it).",
        flag="--no-bias-swiglu-fusion", negative=True)
    bias_dropout_fusion: bool = option(
        True, "Allow the fused bias+dropout+residual kernel (--no-bias-dropout-fusion forbids "
        "it).", flag="--no-bias-dropout-fusion", negative=True)
    apply_rope_fusion: bool = option(
        True, "Allow Transformer Engine's fused RoPE kernel (--no-rope-fusion forbids it).",
        flag="--no-rope-fusion", negative=True)
    gradient_accumulation_fusion: bool = option(
        True, "Allow accumulating weight gradients into the fp32 main gradients inside the "
        "GEMM (Transformer Engine's linears: fuse_wgrad_accumulation; megatron-core's own, the "
        "output layer included: Apex's fused_weight_gradient_mlp_cuda; "
        "--no-gradient-accumulation-fusion forbids it).",
        flag="--no-gradient-accumulation-fusion", negative=True)
    cross_entropy_loss_fusion: bool = option(
        False, "Allow the fused cross-entropy loss (--cross-entropy-fusion-impl's kernel).")
    cross_entropy_fusion_impl: str = option(
        "native", "Fused cross-entropy kernel: native (megatron-core's) or te (Transformer "
        "Engine's parallel cross entropy).", choices=CROSS_ENTROPY_FUSION_IMPLS)
    fp8_format: Optional[str] = option(
        None, "FP8 GEMMs through Transformer Engine: hybrid (E4M3 forward, E5M2 gradients) or "
        "e4m3; unset: no FP8. Needs --bf16, the Transformer Engine flavour and an FP8 GPU.",
        choices=FP8_FORMATS, megatron="fp8", megatron_if="is_fp8")
    fp8_recipe: str = option(
        "delayed", "How FP8 scales are chosen: delayed (amax history), tensorwise (current "
        "scaling), blockwise or mxfp8 (Blackwell), as far as the installed Transformer Engine "
        "has them (custom is refused).", choices=FP8_CHOICES, **_FP8)
    fp8_margin: int = option(0, "Power-of-two margin of the delayed-scaling factor.",
                             at_least=0, **_FP8)
    fp8_amax_history_len: int = option(1, "Steps of amax history the delayed recipe keeps.",
                                       at_least=1, **_FP8)
    fp8_amax_compute_algo: str = option(
        "most_recent", "Which amax of the history the delayed recipe uses.",
        choices=AMAX_COMPUTE_ALGOS, **_FP8)
    fp8_param_gather: bool = option(
        False, "Keep parameters in FP8 and all-gather them in FP8 (distributed optimizer).",
        megatron="fp8_param", megatron_if="is_fp8")
    first_last_layers_bf16: bool = option(
        False, "Run the first and last transformer layers in bf16 under FP8.", **_FP8)
    recompute_granularity: Optional[str] = option(
        None, "Activation recompute: selective (attention core) or full (whole layers); "
        "unset: off.", choices=RECOMPUTE_GRANULARITIES, megatron=True, megatron_if="recomputes")
    recompute_method: Optional[str] = option(
        None, "With full recompute: uniform or block (unset: uniform).",
        choices=RECOMPUTE_METHODS, **_FULL_RECOMPUTE)
    recompute_num_layers: Optional[int] = option(
        None, "With full recompute: layers per recompute chunk (uniform) or recomputed layers "
        "per stage (block); unset: 1.", at_least=1, **_FULL_RECOMPUTE)
    overlap_grad_reduce: bool = option(
        False, "Reduce gradients bucket by bucket during the backward pass instead of after it.")
    overlap_param_gather: bool = option(
        False, "All-gather updated parameters during the next forward pass (distributed "
        "optimizer, with --overlap-grad-reduce).")
    tp_comm_overlap: bool = option(
        False, "Overlap tensor-parallel communication with GEMMs (Transformer Engine "
        "userbuffers, with --sequence-parallel).", megatron=True)
    ddp_bucket_size: Optional[int] = option(
        None, "Elements per gradient-reduction bucket; unset: megatron-core's default.",
        at_least=1)

    def __post_init__(self):
        check(self)
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 contradict each other: pass one.")
        if self.grad_reduce_in_bf16 and not self.bf16:
            raise ConfigError("--grad-reduce-in-bf16 applies to --bf16 runs (their gradients are "
                              "reduced in fp32 unless it is given): add --bf16, or drop it.")
        if self.grad_reduce_in_bf16 and self.accumulate_allreduce_grads_in_fp32:
            raise ConfigError("--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 "
                              "contradict each other: pass one.")
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
    def is_fp8(self) -> bool:
        return self.fp8_format is not None

    @property
    def recomputes(self) -> bool:
        return self.recompute_granularity is not None

    @property
    def full_recompute(self) -> bool:
        return self.recompute_granularity == "full"

    @property
    def resolved_recompute_method(self) -> str:
        return self.recompute_method or "uniform"

    @property
    def resolved_recompute_num_layers(self) -> int:
        return self.recompute_num_layers or 1

    @property
    def resolved_attention_backend(self):
        """megatron-core's `AttnBackend` member of --attention-backend."""
        from megatron.core.transformer.enums import AttnBackend

        return AttnBackend[self.attention_backend]

    @property
    def params_dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    @property
    def dynamic_loss_scaling(self) -> bool:
        """fp16 without --loss-scale: megatron-core's DynamicGradScaler, whose overflowing steps
        are skipped by the optimizer and shrink the scale (Megatron-LM then stops checking for
        NaN itself, and so does the run's non-finite guard)."""
        return self.fp16 and not self.loss_scale

    @property
    def grads_in_fp32(self) -> bool:
        """Megatron-LM's rule for the gradient buffers: bf16 accumulates and reduces in fp32
        unless --grad-reduce-in-bf16; fp16 (and fp32) follow --accumulate-allreduce-grads-in-fp32
        (fp32 gradients are fp32 either way)."""
        if self.bf16:
            return not self.grad_reduce_in_bf16
        return self.accumulate_allreduce_grads_in_fp32

    def notices(self) -> List[str]:
        """What the run says once about flags that change nothing in it."""
        lines = []
        dynamic = [flag for flag, value, default in (
            ("--initial-loss-scale", self.initial_loss_scale, 2**32),
            ("--min-loss-scale", self.min_loss_scale, 1.0),
            ("--loss-scale-window", self.loss_scale_window, 1000),
            ("--hysteresis", self.hysteresis, 2)) if value != default]
        if dynamic and not self.dynamic_loss_scaling:
            why = "--loss-scale sets a constant scale" if self.loss_scale else "no --fp16"
            lines.append(f"{', '.join(dynamic)}: dynamic loss scaling only; this run has none "
                         f"({why}), so they change nothing.")
        if self.attention_softmax_in_fp32 and not (self.fp16 or self.bf16):
            lines.append("--attention-softmax-in-fp32: an fp32 run computes the softmax in fp32 "
                         "anyway (a no-op here).")
        if self.accumulate_allreduce_grads_in_fp32 and not (self.fp16 or self.bf16):
            lines.append("--accumulate-allreduce-grads-in-fp32: an fp32 run's gradients are fp32 "
                         "anyway (a no-op here).")
        return lines

    def check_layout(self, parallel: ParallelConfig) -> None:
        """Refuse choices the parallel layout cannot carry out."""
        if self.loss_scale and not (self.fp16 or self.bf16 or parallel.use_distributed_optimizer):
            raise ConfigError(
                "--loss-scale scales the loss for megatron-core's mixed-precision optimizers "
                "(--fp16, --bf16, or --use-distributed-optimizer); this fp32 run has none, so it "
                "would change nothing: add --fp16, or drop --loss-scale.")
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
        self._check_fp8_parameters(model)
        if model.moe_layer_recompute and self.recompute_granularity == "full":
            raise ConfigError("--moe-layer-recompute is selective recompute of the MoE layers, "
                              "and --recompute-granularity full already recomputes whole "
                              "layers (megatron-core refuses both): drop one of them.")

    def _check_fp8_parameters(self, model: ModelConfig) -> None:
        """--fp8-param-gather builds every Transformer Engine linear's weight as an FP8 tensor
        (megatron-core wraps each layer's construction in TE's fp8_model_init). Two of our init
        steps act on weights after that, and TE 2.11 cannot serve either:

        - the fp32 main weights of the distributed optimizer are taken from the copy TE keeps
          of each weight's value before it was cast to FP8 (`get_high_precision_init_val`,
          transformer_engine/pytorch/module/base.py, read by megatron-core 0.16.1's
          distrib_optimizer.py), which is made inside the module's constructor; after the first
          update the FP8 weights are cast from those main weights, so any change made to a
          weight after its construction is lost;
        - DeepNorm scales only the value rows of the QKV weight (model/layers.py): a slice of a
          Float8Tensor keeps the whole tensor's scale and transpose (Float8Tensor.make_like in
          tensor/float8_tensor.py), and QuantizedTensor's in-place ops dequantize the slice and
          quantize it back with them (quantized_tensor.py), so the Q and K rows change scale
          under current scaling and the transpose no longer matches.

        Hence DeepNorm's weight scaling (model/layers.py) and the experts' layout-independent
        redraw (model/seeding.py, `weight.copy_`) are refused with FP8 parameters."""
        if not self.fp8_param_gather:
            return
        from spannorm_megatron.placements import PLACEMENTS

        if PLACEMENTS[model.norm_placement].scales_built_weights:
            raise ConfigError(
                f"--fp8-param-gather keeps weights in FP8 from their construction, and "
                f"--norm-placement {model.norm_placement} scales its linear weights after "
                f"that (part of the QKV weight in place), which FP8 weights cannot take and the "
                f"optimizer's fp32 main weights would not see: drop --fp8-param-gather, or use "
                f"another placement.")
        if model.is_moe:
            raise ConfigError(
                "--fp8-param-gather keeps weights in FP8 from their construction, and MoE "
                "models (--num-experts) redraw each expert's weights after it, so that they "
                "do not depend on the expert-parallel layout; the optimizer's fp32 main weights "
                "would keep megatron-core's first draw: drop --fp8-param-gather for MoE models.")

    def check_environment(self) -> None:
        """Transformer Engine's attention switches in the environment must say what
        --attention-backend says: megatron-core sets them per backend, and asserts (on the first
        model built) that any set before agree."""
        for name, wanted in zip(NVTE_ATTENTION_VARIABLES,
                                NVTE_BY_ATTENTION_BACKEND[self.attention_backend]):
            value = os.environ.get(name)
            if value is not None and value != str(wanted):
                raise ConfigError(
                    f"{name}={value} in the environment contradicts --attention-backend "
                    f"{self.attention_backend}, which sets it to {wanted}: unset "
                    f"{', '.join(NVTE_ATTENTION_VARIABLES)} and choose the backend with "
                    f"--attention-backend.")

    def check_machine(self, model: ModelConfig,
                      parallel: Optional[ParallelConfig] = None) -> None:
        """Refuse choices this machine cannot run: FP8 and TP overlap need Transformer Engine
        on a GPU (FP8: compute capability 8.9+, e.g. H100; mxfp8: 10.0+); Transformer Engine's
        attention backends and context parallelism need its layers; --fp16 needs float16
        kernels on this device."""
        from spannorm_megatron.machine import transformer_engine_available

        if self.fp16:
            _check_fp16_runs()
        wants_te = [flag for flag, on in (
            ("--fp8-format", self.fp8_format is not None),
            ("--tp-comm-overlap", self.tp_comm_overlap),
            ("--transformer-impl transformer_engine", model.transformer_impl == "transformer_engine"),
        ) if on]
        if wants_te and not transformer_engine_available():
            raise ConfigError(f"{' and '.join(wants_te)} need Transformer Engine on a GPU, and "
                              f"this machine lacks one of them: install the 'te' extra on a GPU "
                              f"host (docs/gpu.md), or drop {' and '.join(wants_te)}.")
        if wants_te and model.transformer_impl == "local":
            raise ConfigError(f"{' and '.join(wants_te)} need the Transformer Engine layers: "
                              f"use --transformer-impl transformer_engine (or auto).")
        uses_te = model.transformer_impl == "transformer_engine" or (
            model.transformer_impl == "auto" and transformer_engine_available())
        self._check_layers(uses_te, parallel, local_because=(
            "--transformer-impl local" if model.transformer_impl == "local"
            else "Transformer Engine on a GPU is not on this machine"))
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

    def _check_layers(self, uses_te: bool, parallel: Optional[ParallelConfig],
                      local_because: str) -> None:
        """What needs the Transformer Engine layers, or megatron-core's local ones."""
        where = f"this run uses megatron-core's local layers ({local_because})"
        if self.attention_backend in TE_ATTENTION_BACKENDS and not uses_te:
            raise ConfigError(
                f"--attention-backend {self.attention_backend} picks one of Transformer Engine's "
                f"attention kernels, and {where}: use --attention-backend auto (or local), or "
                f"run with Transformer Engine on a GPU.")
        if self.attention_backend == "local" and uses_te:
            # Megatron-LM takes it only with its local layer spec, as here.
            raise ConfigError(
                "--attention-backend local is megatron-core's own attention, which runs with "
                "the local layers: add --transformer-impl local, or use --attention-backend "
                "auto.")
        cp = parallel.context_parallel_size if parallel is not None else 1
        if cp > 1 and not uses_te:
            raise ConfigError(
                f"--context-parallel-size {cp} splits every sequence over {cp} ranks, which "
                f"only Transformer Engine's attention can compute (megatron-core's local "
                f"attention sees one whole sequence), and {where}: use "
                f"--context-parallel-size 1, or run with Transformer Engine on a GPU.")

    def transformer_kwargs(self) -> dict:
        """`TransformerConfig` fields (precision, attention, FP8, recompute, TP overlap): the
        fields declared `megatron=`, and the parameters' dtype. The fusions this run allows,
        where their kernels run for a model, are the model's to say
        (`model.fusions.runnable_fusions`)."""
        return dict(megatron_kwargs(self), params_dtype=self.params_dtype)

    def ddp_kwargs(self, parallel: ParallelConfig) -> dict:
        """`DistributedDataParallelConfig` fields."""
        kwargs = dict(use_distributed_optimizer=parallel.use_distributed_optimizer,
                      grad_reduce_in_fp32=self.grads_in_fp32,
                      overlap_grad_reduce=self.overlap_grad_reduce,
                      overlap_param_gather=self.overlap_param_gather,
                      fp8_param_gather=self.fp8_param_gather)
        if self.ddp_bucket_size is not None:
            kwargs["bucket_size"] = self.ddp_bucket_size
        return kwargs

    def optimizer_kwargs(self) -> dict:
        """`OptimizerConfig` fields: precision and loss scaling (megatron-core builds the
        ConstantGradScaler or DynamicGradScaler from them, as Megatron-LM does)."""
        return dict(bf16=self.bf16, fp16=self.fp16, params_dtype=self.params_dtype,
                    loss_scale=self.loss_scale, initial_loss_scale=self.initial_loss_scale,
                    min_loss_scale=self.min_loss_scale, loss_scale_window=self.loss_scale_window,
                    hysteresis=self.hysteresis)


def _device_capability() -> Tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability())


@functools.lru_cache(maxsize=None)
def _cpu_fp16_problem() -> Optional[str]:
    """Why float16 training cannot run on this CPU, or None: one step of what a GPT layer does
    (embedding, matmul, layer norm, GeLU, SiLU, softmax, dropout, backward), on a forked RNG.
    torch 2.13 runs all of it on CPU; an older build or another CPU backend may not."""
    import torch

    F = torch.nn.functional
    try:
        with torch.random.fork_rng(devices=[]):
            x = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
            w = torch.randn(8, 8, dtype=torch.float16, requires_grad=True)
            table = torch.randn(16, 8, dtype=torch.float16, requires_grad=True)
            h = F.layer_norm(F.embedding(torch.tensor([1, 2, 3, 4]), table) + x @ w, (8,))
            h = F.dropout(torch.softmax(F.gelu(h) + F.silu(h), dim=-1), 0.1)
            h.float().sum().backward()
    except (RuntimeError, NotImplementedError) as error:
        return str(error).splitlines()[0]
    return None


def _check_fp16_runs() -> None:
    from spannorm_megatron.machine import has_accelerator

    if has_accelerator():
        return  # GPUs have float16 kernels (and no CUDA context is made before the rank's own)
    problem = _cpu_fp16_problem()
    if problem is not None:
        raise ConfigError(f"--fp16: float16 does not run on this CPU ({problem}). Use --bf16 or "
                          f"fp32 here.")
