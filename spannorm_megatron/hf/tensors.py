"""Tensor layout changes between megatron-core and Hugging Face (pure torch, no I/O).

megatron-core packs the attention input projection per query group: for each of the G key/value
groups, the rows of its P = heads / G query heads, then its key head, then its value head, each
`head_dim` rows:

    linear_qkv = [q_(g,1) .. q_(g,P), k_g, v_g] for g = 1 .. G        (G * (P + 2) * d rows)

Hugging Face keeps three matrices, `q_proj` (heads * d rows, head-major), `k_proj` and `v_proj`
(G * d rows each). The same holds for the biases (1-D, same row order).

megatron-core's SwiGLU `linear_fc1` is `[gate; up]` stacked along the output rows (the
activation is `silu(gate) * up`); Hugging Face keeps `gate_proj` and `up_proj`.

Every function works on meta tensors too, which is how the export plans shapes without data.
"""

from __future__ import annotations

from typing import Tuple

import torch


def unpack_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron `linear_qkv` weight [G*(P+2)*d, in] (or bias [G*(P+2)*d]) -> (q, k, v)."""
    per_group = num_heads // num_groups
    rest = qkv.shape[1:]
    expected = num_groups * (per_group + 2) * head_dim
    if qkv.shape[0] != expected:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {expected} "
                         f"({num_groups} groups x ({per_group} q + k + v) x {head_dim})")
    grouped = qkv.reshape(num_groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(num_heads * head_dim, *rest)
    k = grouped[:, per_group].reshape(num_groups * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(num_groups * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
             num_groups: int, head_dim: int) -> torch.Tensor:
    """(q, k, v) -> megatron `linear_qkv` (inverse of `unpack_qkv`)."""
    per_group = num_heads // num_groups
    rest = q.shape[1:]
    for name, t, rows in (("q", q, num_heads * head_dim), ("k", k, num_groups * head_dim),
                          ("v", v, num_groups * head_dim)):
        if t.shape[0] != rows or t.shape[1:] != rest:
            raise ValueError(f"{name}_proj has shape {tuple(t.shape)}, expected "
                             f"({rows}, {', '.join(map(str, rest))})")
    grouped = torch.cat([
        q.reshape(num_groups, per_group, head_dim, *rest),
        k.reshape(num_groups, 1, head_dim, *rest),
        v.reshape(num_groups, 1, head_dim, *rest),
    ], dim=1)
    return grouped.reshape(num_groups * (per_group + 2) * head_dim, *rest).contiguous()


def split_swiglu(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """megatron SwiGLU `linear_fc1` [2F, in] (or bias [2F]) -> (gate [F, in], up [F, in])."""
    if fc1.shape[0] % 2:
        raise ValueError(f"a SwiGLU linear_fc1 needs an even number of rows, got {fc1.shape[0]}")
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def merge_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(gate, up) -> megatron SwiGLU `linear_fc1` = [gate; up]."""
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ")
    return torch.cat([gate, up], dim=0).contiguous()


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many NaN/Inf values `tensor` holds (a NaN weight makes every output NaN)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())
