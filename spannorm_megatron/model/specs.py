"""Megatron-Core `ModuleSpec`s for every placement, dense and MoE, in two flavours.

- local: megatron-core's PyTorch modules (column/row parallel linears, `DotProductAttention`,
  `SequentialMLP` experts) and our sequence-parallel-aware norms. Runs anywhere, CPU included.
- transformer_engine: TE linears, attention and grouped experts; a norm whose output only one
  linear reads is fused into it (`TELayerNormColumnParallelLinear`), the rest are `TENorm`.

The fused and standalone forms of a norm save under the same checkpoint key, so checkpoints move
between flavours (megatron-core does the same for its pre-norm local spec).
"""

from __future__ import annotations

import importlib

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.machine import transformer_engine_available
from spannorm_megatron.model.layers import NormPlacementLayer, NormPlacementSubmodules
from spannorm_megatron.model.mla import mla_spec
from spannorm_megatron.model.norms import Norm
from spannorm_megatron.model.scale_init import forward_branch_scale
from spannorm_megatron.model.seeding import seeded_experts, seeded_layer

# Checkpoint key of a norm fused into the linear it feeds (TE's parameter names).
_FUSED_NORM_KEY = {
    "qkv": "self_attention.linear_qkv.layer_norm_",
    "fc1": "mlp.linear_fc1.layer_norm_",
}


def use_transformer_engine(config: ModelConfig) -> bool:
    if config.transformer_impl == "auto":
        return transformer_engine_available()
    if config.transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError(
            "transformer_impl='transformer_engine' needs Transformer Engine and a GPU, and this "
            "machine lacks one of them: install the 'te' extra on a GPU machine, or use "
            "transformer_impl='local' (or 'auto')."
        )
    return config.transformer_impl == "transformer_engine"


def _backend(transformer_engine: bool):
    if transformer_engine:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def layer_spec(config: ModelConfig, transformer_engine: Optional[bool] = None,
               moe: Optional[bool] = None) -> ModuleSpec:
    """The `ModuleSpec` of one transformer layer of `config`'s placement: an MoE layer when
    `moe` (default: whether the model is MoE), else a dense one (the dense layers of an MoE
    model mixed by --moe-layer-freq)."""
    if transformer_engine is None:
        transformer_engine = use_transformer_engine(config)
    if moe is None:
        moe = config.is_moe
    placement = config.placement
    backend = _backend(transformer_engine)
    standalone_norm = backend.layer_norm() if transformer_engine else Norm

    norm_slots, keys_map, fused = {}, {}, set()
    for slot, fusion in placement.norms.items():
        if fusion == "fc1" and moe:
            fusion = "none"  # the MoE router reads the norm's output too
        if fusion == "qkv" and config.multi_latent_attention:
            fusion = "none"  # MLA's query and key/value down projections both read it
        if fusion == "none":
            norm_slots[slot] = standalone_norm
        elif transformer_engine:
            norm_slots[slot] = IdentityOp
            fused.add(fusion)
        else:
            norm_slots[slot] = standalone_norm
            keys_map[f"{slot}."] = _FUSED_NORM_KEY[fusion]
    norm_linear = backend.column_parallel_layer_norm_linear()
    if config.multi_latent_attention:
        attention = mla_spec(config, backend, transformer_engine, keys_map)
    else:
        qk_norm = IdentityOp
        if config.qk_layernorm:
            qk_norm = backend.layer_norm(for_qk=True) if transformer_engine else Norm
        attention = ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=norm_linear if "qkv" in fused else backend.column_parallel_linear(),
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                # Per-head norms of queries and keys (megatron-core's slots; finalize_model_grads
                # sums their gradients over TP ranks, which hold different heads).
                q_layernorm=qk_norm,
                k_layernorm=qk_norm,
            ),
        )
    if moe:
        mlp = get_moe_module_spec_for_backend(
            backend=backend, num_experts=config.num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            moe_use_legacy_grouped_gemm=config.moe_use_legacy_grouped_gemm,
        )
        mlp.submodules.experts.module = seeded_experts(mlp.submodules.experts.module)
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=norm_linear if "fc1" in fused else backend.column_parallel_linear(),
                linear_fc2=backend.row_parallel_linear(),
            ),
        )

    module, name = placement.layer.split(":")
    layer_class = getattr(importlib.import_module(module), name)
    is_placement_layer = issubclass(layer_class, NormPlacementLayer)
    submodules_cls = NormPlacementSubmodules if is_placement_layer else TransformerLayerSubmodules
    params = {name: getattr(config, name) for name in placement.layer_params}
    if is_placement_layer:
        params["branch_scale"] = forward_branch_scale(config)
    return ModuleSpec(
        module=seeded_layer(layer_class),
        params=params,
        submodules=submodules_cls(
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
            **norm_slots,
        ),
    )


def final_norm_enabled(config: ModelConfig) -> bool:
    if config.final_norm is not None:
        return config.final_norm
    return config.placement.final_norm


def block_spec(
    config: ModelConfig,
    transformer_config: TransformerConfig,
    vp_stage: Optional[int] = None,
    transformer_engine: Optional[bool] = None,
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, and the final norm if any."""
    if transformer_engine is None:
        transformer_engine = use_transformer_engine(config)
    specs = {moe: layer_spec(config, transformer_engine, moe=moe)
             for moe in set(config.moe_layer_pattern)}
    final_norm = None
    if final_norm_enabled(config):
        final_norm = _backend(True).layer_norm() if transformer_engine else Norm
    pattern = config.moe_layer_pattern
    return TransformerBlockSubmodules(
        layer_specs=[specs[pattern[i]] for i in stage_layer_ids(transformer_config, vp_stage)],
        layer_norm=final_norm)


def stage_layer_ids(transformer_config: TransformerConfig, vp_stage: Optional[int] = None):
    """0-based global ids of the layers this pipeline stage (and virtual stage) builds, under
    megatron-core's own split (even, uneven first/last stages, or an explicit layout)."""
    layout = transformer_config.pipeline_model_parallel_layout
    if layout is not None:
        return list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage))
    offset = get_transformer_layer_offset(transformer_config, vp_stage=vp_stage)
    count = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return list(range(offset, offset + count))
