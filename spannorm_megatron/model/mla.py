"""Multi-latent attention (DeepSeek-V2/V3) as the attention of any placement.

The attention is megatron-core's own `MLASelfAttention` with the modules its GPT layer specs
give it (`get_gpt_layer_local_spec` / `get_gpt_layer_with_transformer_engine_spec` with
`multi_latent_attention=True`). The placement decides where the norms sit around it, exactly as
for the standard attention; only PreNorm's QKV fusion of the input norm falls away, because
MLA's query and key/value down projections both read that norm's output.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention as _MegatronMLASelfAttention,
)
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.model.norms import Norm
from spannorm_megatron.runtime import has_accelerator


class MLASelfAttention(_MegatronMLASelfAttention):
    """megatron-core's `MLASelfAttention`, constructible without Transformer Engine or a GPU.

    Two things in megatron-core 0.16.1's constructor need them: it takes the import of its
    Transformer Engine names for Transformer Engine being there (without it they are mocks, and
    `isinstance(linear_proj, TELinear)` raises), and it builds the YaRN rotary embedding under
    `with torch.device(torch.cuda.current_device())`, which no CPU runtime can enter (the one
    RoPE without `use_cpu_initialization`). The constructor runs with megatron-core's own answer
    to whether Transformer Engine is installed, and without an accelerator with the host as the
    current device. The forward pass is megatron-core's, unchanged; with Transformer Engine and
    a GPU, so is the constructor."""

    def __init__(self, *args, **kwargs):
        with _constructible_here():
            super().__init__(*args, **kwargs)


class MLADotProductAttention(DotProductAttention):
    """megatron-core's local `DotProductAttention` for MLA's query/key and value widths.

    megatron-core 0.16.1's local MLA spec cannot be built: MLA passes the widths as
    `k_channels` / `v_channels` (which only Transformer Engine's attention accepts), and the
    local attention shapes its output as heads x kv_channels. Queries and keys are
    qk_head_dim + qk_pos_emb_head_dim wide and values v_head_dim, so the output here is
    heads x v_channels; the scores, mask, softmax and dropout are the parent's."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


@contextlib.contextmanager
def _constructible_here():
    from megatron.core.extensions import transformer_engine
    from megatron.core.transformer import multi_latent_attention

    have_te, current_device = multi_latent_attention.HAVE_TE, torch.cuda.current_device
    multi_latent_attention.HAVE_TE = have_te and transformer_engine.HAVE_TE
    if not has_accelerator():
        torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        multi_latent_attention.HAVE_TE, torch.cuda.current_device = have_te, current_device


def mla_spec(config: ModelConfig, backend, transformer_engine: bool, keys_map: dict
             ) -> ModuleSpec:
    """The `ModuleSpec` of the attention of one layer with --multi-latent-attention.

    With --qk-layernorm the query and key/value latents are normalized: by our norms in the
    local flavour, fused into the up projections under Transformer Engine (megatron-core's
    choice in both). The local norms are saved under the fused names (added to `keys_map`, the
    layer's `sharded_state_dict_keys_map`), so checkpoints move between the flavours as they do
    for the other fused norms."""
    latent_norm = IdentityOp
    if transformer_engine:
        down = backend.linear()  # replicated over the TP ranks: the latents are narrow
        up = (backend.column_parallel_layer_norm_linear() if config.qk_layernorm
              else backend.column_parallel_linear())
    else:
        down = up = backend.column_parallel_linear()
        if config.qk_layernorm:
            latent_norm = Norm
            keys_map.update({
                "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
                "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
            })
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=backend.column_parallel_linear(),
            linear_q_down_proj=down,
            linear_q_up_proj=up,
            linear_kv_down_proj=down,
            linear_kv_up_proj=up,
            core_attention=(backend.core_attention() if transformer_engine
                            else MLADotProductAttention),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=latent_norm,
            kv_layernorm=latent_norm,
        ),
    )
