"""Which of megatron-core's fused kernels a model uses: the ones the run allows (Megatron-LM's
`--no-*-fusion` switches, all allowed by default; `--cross-entropy-loss-fusion` asks for one)
that can run here.

A fusion the run allows but this machine cannot run is left off rather than refused: megatron-
core's unfused path computes the same model, so a GPU script trains unchanged on CPU. Why each
kernel may not run:

- bias+GeLU, bias+SwiGLU, bias+dropout+add, native fused cross entropy: megatron-core compiles
  them with its `jit_fuser` (torch.compile). On CPU that needs a C++ toolchain at the first step
  and fails under the CPU runtime (see patches/cpu_eager_expert_bias.py), so they run on GPUs
  only. bias+GeLU also needs a bias to add (Megatron-LM drops it under --disable-bias-linear;
  megatron-core refuses it there).
- RoPE: Transformer Engine's fused_apply_rotary_pos_emb, so TE on a GPU, and rope positions;
  with multi-latent attention megatron-core's Triton MLA kernels, a GPU and YaRN RoPE.
- masked softmax: megatron-core's flag acts on its local attention only
  (`FusedScaleMaskSoftmax`), which needs the CUDA extensions scaled_masked_softmax_cuda and
  scaled_upper_triang_masked_softmax_cuda (Megatron-LM's fused kernels, also built by Apex):
  megatron-core imports them when a half-precision shape qualifies. With the Transformer Engine
  layers it is on wherever Megatron-LM has it on (a GPU): their attention is TE's, which fuses
  scale, mask and softmax itself, and reads no extension.
- gradient accumulation: Megatron-LM's default on GPUs. Transformer Engine's linears do it in
  their own weight-gradient GEMM (`fuse_wgrad_accumulation`: the gradient goes straight into
  the fp32 `main_grad` of megatron-core's DDP, with no bf16 `.grad` and no add per
  micro-batch); megatron-core's own linear layers need Apex's fused_weight_gradient_mlp_cuda
  and refuse the setting without it, and the output layer is one of them even with the TE
  layers. So: with Apex, the `TransformerConfig` field is on and every linear fuses (as in
  Megatron-LM); without Apex but with the TE layers on a GPU, the field stays off (the output
  layer could not be built) and `fuse_weight_gradients_in_te_layers` turns the TE layers' own
  switch on after the model is built (`te_layers_fuse_weight_gradients` says when).
- Transformer Engine's cross entropy (--cross-entropy-fusion-impl te): TE on a GPU.

On CPU every fusion is off: they are CUDA kernels (or compiled for one), and the unfused path
computes the same model.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, Iterable, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.runtime import has_accelerator

MASKED_SOFTMAX_EXTENSIONS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")
GRADIENT_ACCUMULATION_EXTENSION = "fused_weight_gradient_mlp_cuda"  # Apex's

FUSION_FIELDS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
                 "masked_softmax_fusion", "gradient_accumulation_fusion",
                 "cross_entropy_loss_fusion")


def _importable(*modules: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in modules)


def runnable_fusions(model: ModelConfig, allowed=None) -> Dict[str, object]:
    """`TransformerConfig` fusion fields for `model`: on where `allowed` (a run's
    PerformanceConfig) allows the fusion and its kernel can run here. Without `allowed`
    (a model built outside a training run: tools, tests), Megatron-LM's defaults except
    gradient-accumulation fusion, which writes into the main gradients of megatron-core's DDP
    wrapper that only a run's setup (training.setup) adds."""
    from spannorm_megatron.model.specs import transformer_engine_available

    allow = lambda name, default=True: getattr(allowed, name, default)  # noqa: E731
    gpu = has_accelerator()
    te = transformer_engine_available()
    te_layers = te and model.transformer_impl != "local"
    activation = allow("bias_swiglu_fusion") if model.swiglu else (
        allow("bias_gelu_fusion") and model.add_bias_linear)
    cross_entropy_impl = allow("cross_entropy_fusion_impl", "native")
    cross_entropy = allow("cross_entropy_loss_fusion", False) and (
        te if cross_entropy_impl == "te" else gpu)
    return dict(
        bias_activation_fusion=gpu and activation,
        bias_dropout_fusion=gpu and allow("bias_dropout_fusion"),
        apply_rope_fusion=allow("apply_rope_fusion") and _rope_fusion_runs(model, te, gpu),
        masked_softmax_fusion=(allow("masked_softmax_fusion") and gpu and (
            te_layers or _importable(*MASKED_SOFTMAX_EXTENSIONS))),
        gradient_accumulation_fusion=(allow("gradient_accumulation_fusion", False) and gpu
                                      and _importable(GRADIENT_ACCUMULATION_EXTENSION)),
        cross_entropy_loss_fusion=cross_entropy,
        cross_entropy_fusion_impl=cross_entropy_impl,
    )


def te_layers_fuse_weight_gradients(model: ModelConfig, allowed=None) -> bool:
    """Whether a run's Transformer Engine layers accumulate weight gradients in their GEMM while
    megatron-core's `gradient_accumulation_fusion` stays off: the run allows the fusion, the
    layers are TE's on a GPU, and Apex's kernel (which would turn the field on for every
    linear) is missing. Models built outside a run (no `allowed`) have no main gradients."""
    from spannorm_megatron.model.specs import transformer_engine_available

    return bool(getattr(allowed, "gradient_accumulation_fusion", False) and has_accelerator()
                and transformer_engine_available() and model.transformer_impl != "local"
                and not _importable(GRADIENT_ACCUMULATION_EXTENSION))


def fuse_weight_gradients_in_te_layers(chunks: Iterable[torch.nn.Module]) -> int:
    """Turn on Transformer Engine's `fuse_wgrad_accumulation` in every TE module of `chunks`
    (before megatron-core's DDP wraps them: DDP gives each weight its `main_grad`, and counts a
    gradient TE added there as added, `grad_added_to_main_grad`). TE 2.11's modules read the
    attribute on every forward (it is only stored by their constructors). Returns how many."""
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if _is_te_module(module) and hasattr(module, "fuse_wgrad_accumulation"):
                module.fuse_wgrad_accumulation = True
                count += 1
    return count


def _is_te_module(module: torch.nn.Module) -> bool:
    try:
        from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
    except ImportError:
        return False
    return isinstance(module, TransformerEngineBaseModule)


def _rope_fusion_runs(model: ModelConfig, te: bool, gpu: bool) -> bool:
    if model.multi_latent_attention:
        # MLA applies its own RoPE whatever the position embedding type; megatron-core fuses it
        # with its Triton kernels for YaRN only (and refuses the fusion with plain rope).
        from megatron.core.transformer import multi_latent_attention

        return (gpu and model.resolved_rope_type == "yarn"
                and multi_latent_attention.fused_apply_mla_rope_for_q is not None)
    return te and model.position_embedding_type == "rope"


def describe(tconfig: TransformerConfig,
             chunks: Optional[Iterable[torch.nn.Module]] = None) -> str:
    """One log line's worth: which fusions the model uses (`chunks`: the model, to tell
    gradient accumulation fused in the Transformer Engine layers alone)."""
    te_only = not tconfig.gradient_accumulation_fusion and chunks is not None and any(
        getattr(module, "fuse_wgrad_accumulation", False) is True
        for chunk in chunks for module in chunk.modules() if _is_te_module(module))
    names = {"bias_activation_fusion": "bias-activation", "bias_dropout_fusion": "bias-dropout",
             "apply_rope_fusion": "rope", "masked_softmax_fusion": "masked-softmax",
             "gradient_accumulation_fusion": "gradient-accumulation",
             "cross_entropy_loss_fusion": f"cross-entropy ({tconfig.cross_entropy_fusion_impl})"}
    on = [label for field, label in names.items() if getattr(tconfig, field)]
    if te_only:
        on.append("gradient-accumulation (Transformer Engine layers; not megatron-core's output "
                  "layer, which needs Apex)")
        del names["gradient_accumulation_fusion"]
    off = [label for field, label in names.items() if not getattr(tconfig, field)]
    return (f"on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'} (allowed ones are "
            f"off where their kernel cannot run: spannorm_megatron/model/fusions.py)")
