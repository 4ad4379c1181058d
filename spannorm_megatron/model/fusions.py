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
- masked softmax: the CUDA extensions scaled_masked_softmax_cuda and
  scaled_upper_triang_masked_softmax_cuda (Megatron-LM's fused kernels, also built by Apex);
  megatron-core imports them when a half-precision shape qualifies, so they must be importable.
- gradient accumulation: Apex's fused_weight_gradient_mlp_cuda. megatron-core's own linear
  layers refuse the setting without it, and the output layer is one of them even with the
  Transformer Engine layers.
- Transformer Engine's cross entropy (--cross-entropy-fusion-impl te): TE on a GPU.
"""

from __future__ import annotations

import importlib.util
from typing import Dict

from megatron.core.transformer.transformer_config import TransformerConfig

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.runtime import has_accelerator

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
    activation = allow("bias_swiglu_fusion") if model.swiglu else (
        allow("bias_gelu_fusion") and model.add_bias_linear)
    cross_entropy_impl = allow("cross_entropy_fusion_impl", "native")
    cross_entropy = allow("cross_entropy_loss_fusion", False) and (
        te if cross_entropy_impl == "te" else gpu)
    return dict(
        bias_activation_fusion=gpu and activation,
        bias_dropout_fusion=gpu and allow("bias_dropout_fusion"),
        apply_rope_fusion=allow("apply_rope_fusion") and _rope_fusion_runs(model, te, gpu),
        masked_softmax_fusion=(allow("masked_softmax_fusion") and gpu and _importable(
            "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")),
        gradient_accumulation_fusion=(allow("gradient_accumulation_fusion", False) and gpu
                                      and _importable("fused_weight_gradient_mlp_cuda")),
        cross_entropy_loss_fusion=cross_entropy,
        cross_entropy_fusion_impl=cross_entropy_impl,
    )


def _rope_fusion_runs(model: ModelConfig, te: bool, gpu: bool) -> bool:
    if model.multi_latent_attention:
        # MLA applies its own RoPE whatever the position embedding type; megatron-core fuses it
        # with its Triton kernels for YaRN only (and refuses the fusion with plain rope).
        from megatron.core.transformer import multi_latent_attention

        return (gpu and model.resolved_rope_type == "yarn"
                and multi_latent_attention.fused_apply_mla_rope_for_q is not None)
    return te and model.position_embedding_type == "rope"


def describe(tconfig: TransformerConfig) -> str:
    """One log line's worth: which fusions the model uses."""
    names = {"bias_activation_fusion": "bias-activation", "bias_dropout_fusion": "bias-dropout",
             "apply_rope_fusion": "rope", "masked_softmax_fusion": "masked-softmax",
             "gradient_accumulation_fusion": "gradient-accumulation",
             "cross_entropy_loss_fusion": f"cross-entropy ({tconfig.cross_entropy_fusion_impl})"}
    on = [label for field, label in names.items() if getattr(tconfig, field)]
    off = [label for field, label in names.items() if not getattr(tconfig, field)]
    return (f"on: {', '.join(on) or 'none'}; off: {', '.join(off) or 'none'} (allowed ones are "
            f"off where their kernel cannot run: spannorm_megatron/model/fusions.py)")
