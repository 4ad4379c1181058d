"""Transformer layers for the placements megatron-core's `TransformerLayer` cannot express.

megatron-core 0.16 only has pre-norm slots (`input_layernorm`, `pre_mlp_layernorm`), and
`apply_residual_connection_post_layernorm` is read nowhere. Each placement here is a subclass
whose `compute` is the contract's equation (shared/design/norm-placements.md), read top to bottom;
the base class supplies the attention and MLP branches (megatron-core's own modules, built from
the spec, so tensor, sequence and expert parallelism and the Transformer Engine modules work
unchanged) and keeps the `TransformerLayer` interface `TransformerBlock` calls.

`prenorm` is megatron-core's `TransformerLayer` itself and is not redefined here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.utils import make_viewless_tensor

from spannorm_megatron.placements import deepnorm_residual_scale

Branch = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class NormPlacementSubmodules(TransformerLayerSubmodules):
    """`TransformerLayerSubmodules` plus the norms that sit after a residual addition.

    A slot left as `IdentityOp` costs nothing; in the Transformer Engine flavour a norm fused into
    the following linear (e.g. SpanNorm's N1 into the MLP's fc1) is left as `IdentityOp` here.
    """

    embedding_norm: Union[ModuleSpec, type] = IdentityOp
    """N0: normalizes the embedding before the first layer's attention (SpanNorm)."""

    post_attention_norm: Union[ModuleSpec, type] = IdentityOp
    """N1: normalizes the stream after the attention residual addition."""

    post_mlp_norm: Union[ModuleSpec, type] = IdentityOp
    """N2: normalizes the stream after the MLP residual addition."""

    attention_output_norm: Union[ModuleSpec, type] = IdentityOp
    """Normalizes the attention branch's output before it is added (Peri-LN's N1o)."""

    mlp_output_norm: Union[ModuleSpec, type] = IdentityOp
    """Normalizes the MLP branch's output before it is added (Peri-LN's N2o)."""


# The slots NormPlacementLayer builds; the pre-norm slots (input_layernorm, pre_mlp_layernorm)
# are built by TransformerLayer itself.
_EXTRA_NORM_SLOTS = ("post_attention_norm", "post_mlp_norm", "attention_output_norm",
                     "mlp_output_norm")


class NormPlacementLayer(TransformerLayer):
    """Base for layers whose norms sit after residual additions.

    Args beyond `TransformerLayer`'s (passed as `ModuleSpec.params`):
        branch_scale: multiplier on both branch outputs (SpanNorm's `scale_mode='forward'`);
            1.0 leaves the branches as they are.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: NormPlacementSubmodules,
        layer_number: int = 1,
        hidden_dropout: Optional[float] = None,
        pg_collection=None,
        vp_stage: Optional[int] = None,
        branch_scale: float = 1.0,
    ):
        _refuse_unsupported_features(config, type(self).__name__)
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            hidden_dropout=hidden_dropout,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        self.branch_scale = branch_scale
        for slot in _EXTRA_NORM_SLOTS:
            setattr(self, slot, self._build_norm(getattr(submodules, slot)))

    def _build_norm(self, spec) -> torch.nn.Module:
        return build_module(
            spec, config=self.config, hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )

    def compute(self, x: torch.Tensor, attention: Branch, mlp: Branch) -> torch.Tensor:
        """The placement's equation: layer input `x` -> layer output `x'`."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        inference_context=None,
        padding_mask: Optional[torch.Tensor] = None,
        **attention_kwargs,
    ):
        """Same signature and return value, `(output, context)`, as `TransformerLayer.forward`."""
        attention_kwargs.pop("inference_params", None)  # deprecated alias of inference_context

        def attention(x: torch.Tensor) -> torch.Tensor:
            output, bias = self.self_attention(
                x, attention_mask=attention_mask, inference_context=inference_context,
                **attention_kwargs,
            )
            return self._branch_output(output, bias)

        def mlp(x: torch.Tensor) -> torch.Tensor:
            output, bias = self.mlp(x, padding_mask=padding_mask)
            return self._branch_output(output, bias)

        output = self.compute(hidden_states, attention, mlp)
        # Pipeline schedules free a stage's output by swapping its storage, which views forbid.
        output = make_viewless_tensor(output, requires_grad=output.requires_grad, keep_graph=True)
        return output, context

    def _branch_output(self, output: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if bias is not None:
            output = output + bias
        output = F.dropout(output, p=self.hidden_dropout, training=self.training)
        return output if self.branch_scale == 1.0 else output * self.branch_scale


class PostNormLayer(NormPlacementLayer):
    """PostNorm (original Transformer): h = N1(x + A(x)); x' = N2(h + F(h))."""

    def compute(self, x, attention, mlp):
        h = self.post_attention_norm(x + attention(x))
        return self.post_mlp_norm(h + mlp(h))


class SpanNormLayer(NormPlacementLayer):
    """SpanNorm: h = N1(x + A(xin)); x' = N2(x + F(h)); xin = N0(x) in the first layer, else x.

    The block input `x` spans the whole block: it skips N1 and reaches the output through one
    addition and N2. Only the model's first layer (global layer number 1) owns N0, since only
    its input, the embedding, is not normalized yet.

    Extra arg: first_layer_input_norm: build N0 in the first layer (the contract's default).
    """

    def __init__(self, *args, first_layer_input_norm: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        is_first_layer = self.layer_number == 1
        self.embedding_norm = (
            self._build_norm(self.submodules_config.embedding_norm)
            if is_first_layer and first_layer_input_norm
            else IdentityOp()
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if isinstance(self.embedding_norm, IdentityOp):
            return sharded
        # N0 exists in the first layer only, so it cannot be stacked along the layer axis with
        # the other layers' tensors (that checkpoint tensor would miss all rows but one): it is
        # saved on its own, without the layer offset.
        norm_prefix = f"{prefix}embedding_norm."
        sharded = {k: v for k, v in sharded.items() if not k.startswith(norm_prefix)}
        sharded.update(sharded_state_dict_default(
            self.embedding_norm, norm_prefix, (), metadata, tp_group=self.tp_group))
        return sharded

    def compute(self, x, attention, mlp):
        xin = self.embedding_norm(x)
        h = self.post_attention_norm(x + attention(xin))
        return self.post_mlp_norm(x + mlp(h))


class DeepNormLayer(NormPlacementLayer):
    """DeepNorm (DeepNet, decoder-only): h = N1(a*x + A(x)); x' = N2(a*h + F(h)), a = (2L)^(1/4).

    At initialization the value projection (with multi-latent attention: the value rows of the
    key/value up projection), the attention output projection, fc1 and fc2 (every expert's too)
    are divided by beta = (8L)^(1/4); Q and K keep the base init.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        num_layers = self.config.num_layers
        self.residual_scale = deepnorm_residual_scale(num_layers)
        if self.config.perform_initialization:
            self._scale_initial_weights(1.0 / (8.0 * num_layers) ** 0.25)

    @torch.no_grad()
    def _scale_initial_weights(self, factor: float) -> None:
        attention = self.self_attention
        if self.config.multi_latent_attention:
            # linear_kv_up_proj makes each local head's [k (qk_head_dim), v (v_head_dim)] rows
            # from the latent: the values are the last v_head_dim rows of every head.
            v_dim = self.config.v_head_dim
            kv_up = attention.linear_kv_up_proj.weight
            kv_up.view(attention.num_attention_heads_per_partition, -1, kv_up.shape[-1])[
                :, -v_dim:].mul_(factor)
        else:
            # linear_qkv packs each local query group as [q_1 .. q_n, k, v] rows of head_dim each.
            head_dim = self.config.kv_channels
            qkv = attention.linear_qkv.weight
            per_group = qkv.shape[0] // attention.num_query_groups_per_partition
            qkv.view(attention.num_query_groups_per_partition, per_group, -1)[
                :, per_group - head_dim:].mul_(factor)
        attention.linear_proj.weight.mul_(factor)
        for name, param in self.mlp.named_parameters():
            # fc1 and fc2 of the dense MLP, of every expert and of the shared expert (grouped
            # experts name them weight1/weight2); not biases, not the router.
            is_weight = "weight" in name.rsplit(".", 1)[-1]
            if is_weight and ("linear_fc" in name or name.endswith(("weight1", "weight2"))):
                param.mul_(factor)

    def compute(self, x, attention, mlp):
        a = self.residual_scale
        h = self.post_attention_norm(a * x + attention(x))
        return self.post_mlp_norm(a * h + mlp(h))


class PeriNormLayer(NormPlacementLayer):
    """Peri-LN / sandwich norm: h = x + N1o(A(N1i(x))); x' = h + N2o(F(N2i(h))).

    N1i and N2i are `TransformerLayer`'s own pre-norm slots, so Transformer Engine can fuse them
    into the QKV projection and fc1 exactly as for PreNorm.
    """

    def compute(self, x, attention, mlp):
        h = x + self.attention_output_norm(attention(self.input_layernorm(x)))
        return h + self.mlp_output_norm(mlp(self.pre_mlp_layernorm(h)))


class SpanNormCleanLayer(NormPlacementLayer):
    """The other reading of SpanNorm: h = N1(x + A(x)); x' = x + N2(h + F(h)).

    The stream is never normalized; each block adds its PostNorm-style output, with N2's gain
    initialized to 1/sqrt(L) so that Var(x_l) <= Var(x_0) + l/L.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        gain = 1.0 / self.config.num_layers ** 0.5
        with torch.no_grad():
            # apply_layernorm_1p stores (gain - 1).
            offset = 1.0 if self.config.layernorm_zero_centered_gamma else 0.0
            self.post_mlp_norm.weight.fill_(gain - offset)

    def compute(self, x, attention, mlp):
        h = self.post_attention_norm(x + attention(x))
        return x + self.post_mlp_norm(h + mlp(h))


def _refuse_unsupported_features(config: TransformerConfig, layer_name: str) -> None:
    """These megatron-core features reach into `TransformerLayer`'s pre-norm forward, which the
    placement layers replace; refuse them instead of silently ignoring them."""
    problems = []
    if config.recompute_granularity == "selective" and {"layernorm", "mlp"} & set(
        config.recompute_modules or ()
    ):
        problems.append(
            "selective recompute of 'layernorm'/'mlp' (use recompute_granularity='full', or "
            "selective with recompute_modules=['core_attn'])"
        )
    if getattr(config, "cuda_graph_impl", "none") not in ("none", None):
        problems.append("CUDA graphs (cuda_graph_impl must be 'none')")
    if getattr(config, "fine_grained_activation_offloading", False):
        problems.append("fine-grained activation offloading")
    if getattr(config, "inference_fuse_tp_communication", False):
        problems.append("inference_fuse_tp_communication")
    if problems:
        raise ValueError(
            f"{layer_name} does not support: {'; '.join(problems)}. Turn these off, or use the "
            f"'prenorm' placement, which runs megatron-core's own TransformerLayer."
        )
