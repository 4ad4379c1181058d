"""An independent plain-PyTorch computation of the norm-placement contract.

Written from shared/design/norm-placements.md and the standard definitions of the sublayers,
without megatron-core: the tests compare megatron-core models built from our specs against it.
Weights are read from a megatron-core layer by parameter name; nothing else is shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

# Which parameter holds each of the contract's norms, per placement.
NORM_NAMES = {
    "prenorm": {"N1": "input_layernorm", "N2": "pre_mlp_layernorm"},
    "postnorm": {"N1": "post_attention_norm", "N2": "post_mlp_norm"},
    "spannorm": {"N0": "embedding_norm", "N1": "post_attention_norm", "N2": "post_mlp_norm"},
    "deepnorm": {"N1": "post_attention_norm", "N2": "post_mlp_norm"},
    "perinorm": {"N1i": "input_layernorm", "N1o": "attention_output_norm",
                 "N2i": "pre_mlp_layernorm", "N2o": "mlp_output_norm"},
    "spannorm_clean": {"N1": "post_attention_norm", "N2": "post_mlp_norm"},
}


@dataclass
class Shapes:
    hidden: int
    heads: int
    groups: int
    normalization: str = "RMSNorm"
    eps: float = 1e-5
    swiglu: bool = True
    topk: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def norm(x, params: Dict[str, torch.Tensor], prefix: str, shapes: Shapes):
    gain = params[f"{prefix}.weight"]
    if shapes.normalization == "RMSNorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + shapes.eps) * gain
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + shapes.eps) * gain + params[f"{prefix}.bias"]


def rope_frequencies(seq_len: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles [s, head_dim] of rotary embedding: the half-split (GPT-NeoX / Llama) layout."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return torch.cat([angles, angles], dim=-1)


def _rotate(x, angles):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def attention(x, params, prefix: str, shapes: Shapes, angles: Optional[torch.Tensor]):
    """Causal grouped-query self-attention on x [s, b, h]."""
    s, b, _ = x.shape
    d, per_group = shapes.head_dim, shapes.heads // shapes.groups
    qkv = x @ params[f"{prefix}.linear_qkv.weight"].T
    # megatron-core packs the projection per query group: [q_1..q_per_group, k, v] * groups.
    qkv = qkv.view(s, b, shapes.groups, per_group + 2, d)
    q = qkv[:, :, :, :per_group].reshape(s, b, shapes.heads, d)
    k = qkv[:, :, :, per_group].repeat_interleave(per_group, dim=2)
    v = qkv[:, :, :, per_group + 1].repeat_interleave(per_group, dim=2)
    if angles is not None:
        a = angles[:, None, None, :]
        q, k = _rotate(q, a), _rotate(k, a)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, shapes.hidden)
    return out @ params[f"{prefix}.linear_proj.weight"].T


def dense_mlp(x, params, prefix: str, shapes: Shapes):
    up = x @ params[f"{prefix}.linear_fc1.weight"].T
    if shapes.swiglu:
        gate, value = up.chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * value
    else:
        act = torch.nn.functional.gelu(up)
    return act @ params[f"{prefix}.linear_fc2.weight"].T


def moe_mlp(x, params, prefix: str, shapes: Shapes, num_experts: int):
    """Top-k routing (softmax over the top-k logits), every selected expert weighted by its
    probability, plus the shared expert when there is one."""
    s, b, h = x.shape
    tokens = x.reshape(s * b, h)
    logits = tokens @ params[f"{prefix}.router.weight"].T
    top_logits, top_experts = logits.topk(shapes.topk, dim=-1)
    probs = top_logits.softmax(-1)
    out = torch.zeros_like(tokens)
    for e in range(num_experts):
        token_idx, slot = (top_experts == e).nonzero(as_tuple=True)
        if token_idx.numel():
            y = dense_mlp(tokens[token_idx], params, f"{prefix}.experts.local_experts.{e}", shapes)
            out = out.index_add(0, token_idx, y * probs[token_idx, slot, None])
    if f"{prefix}.shared_experts.linear_fc1.weight" in params:
        out = out + dense_mlp(tokens, params, f"{prefix}.shared_experts", shapes)
    return out.view(s, b, h)


def layer(placement: str, x, params, shapes: Shapes, angles=None, num_experts=None,
          first_layer: bool = False, num_layers: int = 1):
    """The contract's equation for one layer, on x [s, b, h]."""
    names = NORM_NAMES[placement]

    def N(tag, t):
        return norm(t, params, names[tag], shapes)

    def A(t):
        return attention(t, params, "self_attention", shapes, angles)

    def F(t):
        if num_experts:
            return moe_mlp(t, params, "mlp", shapes, num_experts)
        return dense_mlp(t, params, "mlp", shapes)

    if placement == "prenorm":
        h = x + A(N("N1", x))
        return h + F(N("N2", h))
    if placement == "postnorm":
        h = N("N1", x + A(x))
        return N("N2", h + F(h))
    if placement == "spannorm":
        xin = N("N0", x) if first_layer else x
        h = N("N1", x + A(xin))
        return N("N2", x + F(h))
    if placement == "deepnorm":
        a = (2 * num_layers) ** 0.25
        h = N("N1", a * x + A(x))
        return N("N2", a * h + F(h))
    if placement == "perinorm":
        h = x + N("N1o", A(N("N1i", x)))
        return h + N("N2o", F(N("N2i", h)))
    if placement == "spannorm_clean":
        h = N("N1", x + A(x))
        return x + N("N2", h + F(h))
    raise KeyError(placement)
