"""Which MoE execution options this machine can run, asked before anything is built.

megatron-core 0.16.1 finds out only while building or running a layer, deep inside the model
(`--moe-grouped-gemm` without Transformer Engine ends in an AssertionError wrapped by four
`build_module` frames). Each option below is refused here with what it needs, using the same
availability flags megatron-core itself reads, so the answer cannot drift from what it would do.

`portable(config)` is the same model without these options: what a single-process reader
(conversion, evaluation, generation on any machine) builds from a record written on GPUs.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.runtime import has_accelerator


def _te_grouped_linear() -> bool:
    from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear

    return TEColumnParallelGroupedLinear is not None


def _grouped_gemm_package() -> bool:
    from megatron.core.transformer.moe import grouped_gemm_util

    return grouped_gemm_util.grouped_gemm_is_available()


def _te_kernels(*names: str) -> bool:
    """Transformer Engine's fused MoE functions, as megatron-core's moe_utils imported them."""
    from megatron.core.transformer.moe import moe_utils

    return bool(moe_utils.HAVE_TE) and all(getattr(moe_utils, n, None) is not None
                                           for n in names)


def _flex_backend(backend: str) -> bool:
    from megatron.core.transformer.moe import fused_a2a

    return bool(fused_a2a.HAVE_HYBRIDEP if backend == "hybridep" else fused_a2a.HAVE_DEEP_EP)


def _te_available() -> bool:
    from spannorm_megatron.model.specs import transformer_engine_available

    return transformer_engine_available()


def moe_kernel_problems(config: ModelConfig, transformer_engine: bool) -> List[str]:
    """Why this machine cannot run `config`'s MoE execution options, one sentence each; [] if
    it can. `transformer_engine`: whether the layers are built from the TE spec."""
    if not config.is_moe:
        return []
    gpu = has_accelerator()
    where = "" if gpu else " (this machine has no GPU)"
    problems = []
    if config.moe_grouped_gemm:
        te_grouped = (transformer_engine and not config.moe_use_legacy_grouped_gemm
                      and _te_grouped_linear())
        if not te_grouped and not (gpu and _grouped_gemm_package()):
            legacy = ("--moe-use-legacy-grouped-gemm asks for megatron-core's legacy GroupedMLP"
                      if config.moe_use_legacy_grouped_gemm else
                      "without the Transformer Engine layers megatron-core builds its legacy "
                      "GroupedMLP")
            problems.append(
                f"--moe-grouped-gemm needs Transformer Engine's grouped linears (the "
                f"transformer_engine flavour: --transformer-impl transformer_engine or auto, on "
                f"a GPU with Transformer Engine) or the grouped_gemm package on a GPU; "
                f"{legacy}, and the grouped_gemm package is "
                f"{'installed' if _grouped_gemm_package() else 'not installed'}{where}. Drop "
                f"--moe-grouped-gemm: the experts then run one after another "
                f"(SequentialMLP), the same math")
    if config.moe_permute_fusion and not (gpu and _te_kernels(
            "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
            "fused_sort_chunks_by_index_with_probs", "fused_unpermute")):
        problems.append(f"--moe-permute-fusion needs Transformer Engine >= 2.1's permutation "
                        f"kernels on a GPU{where}: drop it (the dispatcher then permutes with "
                        f"PyTorch, the same result)")
    if config.moe_router_fusion and not (gpu and _te_kernels(
            "fused_topk_with_score_function", "fused_compute_score_for_moe_aux_loss",
            "fused_moe_aux_loss")):
        problems.append(f"--moe-router-fusion needs Transformer Engine >= 2.7's routing kernels "
                        f"on a GPU{where}: drop it (the router then runs in PyTorch)")
    if config.moe_token_dispatcher_type == "flex":
        backend = "deepep" if config.moe_enable_deepep else config.moe_flex_dispatcher_backend
        if not (gpu and _flex_backend(backend)):
            package = "deep_ep.HybridEPBuffer" if backend == "hybridep" else "deep_ep.Buffer"
            problems.append(f"--moe-token-dispatcher-type flex with the {backend} backend needs "
                            f"{package} (the deep_ep package) on GPUs{where}: use alltoall or "
                            f"allgather")
    if config.moe_latent_size is not None and not _te_available():
        problems.append(f"--moe-latent-size builds its two projections from Transformer "
                        f"Engine's TELinear (megatron-core), which needs Transformer Engine on a "
                        f"GPU{where}: drop it")
    return problems


def check_moe_kernels(config: ModelConfig, transformer_engine: Optional[bool] = None) -> None:
    """Raise ConfigError naming every MoE execution option this machine cannot run."""
    if transformer_engine is None:
        from spannorm_megatron.model.specs import use_transformer_engine

        transformer_engine = use_transformer_engine(config)
    problems = moe_kernel_problems(config, transformer_engine)
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def portable(config: ModelConfig) -> ModelConfig:
    """`config` computed with PyTorch everywhere: the same parameters and the same function,
    without the kernels and communication libraries of a GPU run (fusions, the flex
    dispatcher). Grouped GEMMs are kept: their parameters are laid out differently."""
    if not config.is_moe:
        return config
    dispatcher = config.moe_token_dispatcher_type
    return dataclasses.replace(
        config, moe_permute_fusion=False, moe_router_fusion=False,
        moe_token_dispatcher_type="alltoall" if dispatcher == "flex" else dispatcher,
        moe_enable_deepep=False, moe_flex_dispatcher_backend="deepep", moe_deepep_num_sms=20,
        moe_hybridep_num_sms=16,
        moe_router_padding_for_quantization=False, moe_router_padding_for_fp8=False)
