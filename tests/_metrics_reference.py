"""Independent recomputation of what the metrics measure, for tests/test_metrics.py.

From a model's weights (read by parameter name) and the step's micro-batches, recompute with
tests/reference.py's plain-PyTorch sublayers (no megatron-core, no hooks): per layer the
sum of squares and element count of the layer output and of both branch outputs, and for MoE
layers the tokens per expert and the load-balancing loss (Switch Transformer form, as the
router's docstring defines it: E * sum_e f_e * P_e per micro-batch, averaged over them).
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch

import reference


def shapes_of(config) -> reference.Shapes:
    return reference.Shapes(
        hidden=config.hidden_size, heads=config.num_attention_heads,
        groups=config.resolved_num_query_groups, normalization=config.normalization,
        eps=config.norm_epsilon, swiglu=config.swiglu, topk=config.moe_router_topk,
    )


def _router_stats(x: torch.Tensor, params: dict, prefix: str, shapes: reference.Shapes,
                  num_experts: int):
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ params[f"{prefix}.router.weight"].T
    _, top = logits.topk(shapes.topk, dim=-1)
    counts = torch.zeros(num_experts, dtype=torch.float64)
    counts.index_add_(0, top.reshape(-1), torch.ones(top.numel(), dtype=torch.float64))
    scores = logits.softmax(-1)
    T = tokens.shape[0]
    f = counts / (T * shapes.topk)
    P = scores.sum(0).double() / T
    return counts, float(num_experts * (f * P).sum())


def signals(config, named_params: Dict[str, torch.Tensor], batches: List[dict]) -> Dict:
    """{'sum_sq': {signal: [per layer]}, 'count': {...}, 'expert_counts': [[...]],
    'aux_loss': [per layer]} over all micro-batches of `batches`."""
    placement = config.norm_placement
    shapes = shapes_of(config)
    L = config.num_layers
    names = reference.NORM_NAMES[placement]
    out = {"sum_sq": {s: [0.0] * L for s in ("output", "attention", "mlp")},
           "count": {s: [0] * L for s in ("output", "attention", "mlp")},
           "expert_counts": [[0.0] * (config.num_experts or 0) for _ in range(L)],
           "aux_loss": [0.0] * L}

    def add(signal, i, t):
        out["sum_sq"][signal][i] += float(t.double().square().sum())
        out["count"][signal][i] += t.numel()

    angles = reference.rope_frequencies(batches[0]["tokens"].shape[1], shapes.head_dim)
    with torch.no_grad():
        for batch in batches:
            x = named_params["embedding.word_embeddings.weight"][batch["tokens"]].transpose(0, 1)
            for i in range(L):
                prefix = f"decoder.layers.{i}."
                p = {n[len(prefix):]: v for n, v in named_params.items() if n.startswith(prefix)}

                def N(tag, t):
                    return reference.norm(t, p, names[tag], shapes)

                def A(t):
                    return reference.attention(t, p, "self_attention", shapes, angles)

                def F(t):
                    if config.is_moe:
                        counts, aux = _router_stats(t, p, "mlp", shapes, config.num_experts)
                        for e in range(config.num_experts):
                            out["expert_counts"][i][e] += float(counts[e])
                        out["aux_loss"][i] += aux / len(batches)
                        return reference.moe_mlp(t, p, "mlp", shapes, config.num_experts)
                    return reference.dense_mlp(t, p, "mlp", shapes)

                if placement == "prenorm":
                    a = A(N("N1", x))
                    h = x + a
                    f = F(N("N2", h))
                    x = h + f
                elif placement == "spannorm":
                    a = A(N("N0", x) if (i == 0 and config.first_layer_input_norm) else x)
                    h = N("N1", x + a)
                    f = F(h)
                    x = N("N2", x + f)
                else:
                    raise KeyError(placement)
                add("attention", i, a)
                add("mlp", i, f)
                add("output", i, x)
    return out


def rms(ref: Dict, signal: str) -> Dict[int, float]:
    return {i + 1: math.sqrt(s / c) for i, (s, c) in
            enumerate(zip(ref["sum_sq"][signal], ref["count"][signal]))}
