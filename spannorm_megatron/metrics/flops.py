"""Model FLOPs of our GPT, and model FLOPs utilization (MFU).

Why: TFLOP/s and MFU are the numbers that say whether a run uses its hardware well, and they
are only comparable between runs (and with Megatron-LM's logs) when the FLOPs are counted the
same way. This module counts them from the `ModelConfig` alone, with the conventions of
Megatron-LM's `num_floating_point_operations` (arXiv 2104.04473, appendix), so no model or
device is needed.

The formula (matrix multiplications only, 2 FLOPs per multiply-add; norms, softmax, RoPE,
activations and the loss are left out, as everyone does):

    h = hidden_size, L = num_layers, V = vocab_size (already padded), s = sequence length
    n = attention heads, g = query groups (GQA; g = n is MHA), d = kv_channels (default h / n)
    q = n * d (query width), kv = g * d (key/value width)
    glu = 2 for SwiGLU (fc1 makes gate and up projections), 1 for GeLU

    forward FLOPs per token, one layer:
      attention   QKV projection            2 * h * (q + 2 * kv)
                  scores Q K^T              2 * q * s * c        c = 1/2 causal (as Megatron-LM:
                  context  P V              2 * q * s * c        half the score matrix is needed)
                  output projection         2 * q * h
      dense MLP   fc1 + fc2                 2 * h * f * glu + 2 * f * h      f = ffn_hidden_size
      MoE MLP     router                    2 * h * E                         E = num_experts
                  top-k routed experts      k * (2 * h * fe * glu + 2 * fe * h)
                  shared expert             2 * h * fs * glu + 2 * fs * h    (if configured)
      multi-latent attention (Megatron-LM's count, less its norm terms):
                  Q   2 * h * n * (dqk + dr), or with a query latent of rank rq
                      2 * rq * (h + n * (dqk + dr))          dqk/dr/dv: --qk-head-dim,
                  KV  2 * (h * (rkv + dr) + rkv * n * (dqk + dv))  --qk-pos-emb-head-dim,
                  scores 2 * n * (dqk + dr) * s * c, context 2 * n * dv * s * c, --v-head-dim;
                  output 2 * n * dv * h                            rkv: --kv-lora-rank
    forward FLOPs per token, model  =  L * layer + 2 * h * V (logits layer)

    training FLOPs per token        =  3 * forward     (backward = 2 GEMMs per forward GEMM:
                                                        data gradient and weight gradient)
    with activation recompute       +  L * layer       (recompute='full': the layers' forward
                                                        runs again in the backward pass)
                                    +  L * (scores + context)   (recompute='selective': core
                                                        attention only, megatron's default)
    per iteration                   =  per token * global_batch_size * s

Recompute FLOPs are *hardware* FLOPs; MFU, by definition (PaLM, arXiv 2204.02311), uses the
model FLOPs without them. Megatron-LM's TFLOP/s also leaves recompute out; pass `recompute` only
to get the hardware FLOPs utilization (HFU).

One term differs from Megatron-LM's count: the MoE router GEMM (2*h*E per token, tiny), which
Megatron-LM omits; `include_router=False` drops it. With s << h the attention score terms are
small; at long contexts they dominate, hence the causal factor matters.

On CPU the device peak is an estimate (`cpu_peak_flops`), so CPU MFU is indicative only.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

from spannorm_megatron.config.environment import PEAK_TFLOPS_ENV  # the table's override
from spannorm_megatron.config.model import ModelConfig

RECOMPUTE_CHOICES = (None, "selective", "full")


@dataclass(frozen=True)
class ForwardFlops:
    """Forward-pass FLOPs per token, by component. Layer terms are for ONE layer."""

    qkv: float
    attention_scores: float
    attention_context: float
    attention_output: float
    mlp: float
    """Dense MLP, or for MoE: the routed experts (top-k) plus the shared expert."""
    router: float
    logits: float
    num_layers: int

    @property
    def attention(self) -> float:
        """One layer's attention: projections plus core attention."""
        return self.qkv + self.attention_scores + self.attention_context + self.attention_output

    @property
    def layer(self) -> float:
        """One transformer layer."""
        return self.attention + self.mlp + self.router

    @property
    def total(self) -> float:
        """The whole model's forward pass per token."""
        return self.num_layers * self.layer + self.logits

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def forward_flops(
    config: ModelConfig,
    seq_length: int,
    *,
    causal: bool = True,
    include_router: bool = True,
) -> ForwardFlops:
    """Forward FLOPs per token of `config` at sequence length `seq_length` (formula: module doc).

    `causal=False` counts the full score matrix (what an unfused attention kernel actually
    multiplies; megatron-core's local `DotProductAttention` does that).
    """
    if seq_length <= 0:
        raise ValueError(f"seq_length={seq_length} must be positive.")
    h = config.hidden_size
    n = config.num_attention_heads
    d = config.resolved_kv_channels
    q = n * d
    kv = config.resolved_num_query_groups * d
    glu = 2 if config.swiglu else 1
    causal_factor = 0.5 if causal else 1.0
    if config.multi_latent_attention:
        qkv, scores, context, output = _mla_flops(config, seq_length, causal_factor)
    else:
        qkv = 2.0 * h * (q + 2 * kv)
        scores = context = 2.0 * q * seq_length * causal_factor
        output = 2.0 * q * h

    def mlp_flops(inner: int) -> float:
        return 2.0 * h * inner * glu + 2.0 * inner * h

    if config.is_moe:
        expert_ffn = config.resolved_moe_ffn_hidden_size
        mlp = config.moe_router_topk * mlp_flops(expert_ffn)
        if config.moe_shared_expert_intermediate_size:
            mlp += mlp_flops(config.moe_shared_expert_intermediate_size)
        router = 2.0 * h * config.num_experts if include_router else 0.0
        # --moe-layer-freq: the per-layer figures are averages over dense and MoE layers.
        moe_share = sum(config.moe_layer_pattern) / config.num_layers
        mlp = moe_share * mlp + (1 - moe_share) * mlp_flops(config.resolved_ffn_hidden_size)
        router *= moe_share
    else:
        mlp = mlp_flops(config.resolved_ffn_hidden_size)
        router = 0.0

    return ForwardFlops(
        qkv=qkv,
        attention_scores=scores,
        attention_context=context,
        attention_output=output,
        mlp=mlp,
        router=router,
        logits=2.0 * h * config.vocab_size,
        num_layers=config.num_layers,
    )


def _mla_flops(config: ModelConfig, seq_length: int, causal_factor: float):
    """(qkv, scores, context, output) forward FLOPs per token of multi-latent attention, the
    GEMMs Megatron-LM's num_floating_point_operations counts for it (less its norm terms)."""
    h, n = config.hidden_size, config.num_attention_heads
    q_head = config.qk_head_dim + config.qk_pos_emb_head_dim
    if config.q_lora_rank is None:
        queries = h * n * q_head
    else:
        queries = config.q_lora_rank * (h + n * q_head)
    # Down projection to the latent and the shared RoPE key, up projection to keys and values.
    keys_values = (h * (config.kv_lora_rank + config.qk_pos_emb_head_dim)
                   + config.kv_lora_rank * n * (config.qk_head_dim + config.v_head_dim))
    return (2.0 * (queries + keys_values),
            2.0 * n * q_head * seq_length * causal_factor,
            2.0 * n * config.v_head_dim * seq_length * causal_factor,
            2.0 * n * config.v_head_dim * h)


def flops_per_token(
    config: ModelConfig,
    seq_length: int,
    *,
    recompute: Optional[str] = None,
    include_router: bool = True,
) -> float:
    """Training (forward + backward) FLOPs per token; `recompute` adds recomputed forward work.

    recompute: None (model FLOPs, use for MFU), 'selective' (core attention recomputed, as
    megatron-core's default selective recompute), 'full' (every layer's forward recomputed).
    """
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute={recompute!r} is not one of {list(RECOMPUTE_CHOICES)}.")
    fwd = forward_flops(config, seq_length, include_router=include_router)
    total = 3.0 * fwd.total
    if recompute == "full":
        total += fwd.num_layers * fwd.layer
    elif recompute == "selective":
        total += fwd.num_layers * (fwd.attention_scores + fwd.attention_context)
    return total


def flops_per_iteration(
    config: ModelConfig,
    seq_length: int,
    global_batch_size: int,
    *,
    recompute: Optional[str] = None,
    include_router: bool = True,
) -> float:
    """Training FLOPs of one iteration: every token of the global batch, forward + backward."""
    return flops_per_token(config, seq_length, recompute=recompute,
                           include_router=include_router) * global_batch_size * seq_length


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float,
        num_devices: int = 1) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over peak FLOP/s, in [0, 1].

    `tokens_per_second` is the throughput of `num_devices` devices together (the whole job's
    tokens/s with num_devices = world size), `peak_flops` the peak of ONE device (FLOP/s, as
    `device_peak_flops` returns).
    """
    if peak_flops is None or peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be a positive number of FLOP/s.")
    if num_devices <= 0:
        raise ValueError(f"num_devices={num_devices} must be positive.")
    return tokens_per_second * flops_per_token / (peak_flops * num_devices)


# --------------------------------------------------------------------------------- peak FLOP/s
# Dense (no 2:4 sparsity) tensor-core peaks per GPU in TFLOP/s, from NVIDIA's data sheets.
# 'fp32' is the non-tensor-core rate; 'tf32' what fp32 matmuls reach when TF32 is allowed.
# A100 has no FP8 tensor cores (None).
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "fp8": 1513.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp8": None, "tf32": 156.0, "fp32": 19.5},
}

_DTYPE_NAMES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp8": "fp8", "float8": "fp8", "tf32": "tf32", "fp32": "fp32", "float32": "fp32",
    "float": "fp32",
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = "fp8"


def gpu_model(device_name: str) -> Optional[str]:
    """Key of PEAK_TFLOPS for a `torch.cuda.get_device_name()` string, or None if unknown.

    Examples: 'NVIDIA H100 80GB HBM3' -> 'H100 SXM', 'NVIDIA H100 PCIe' -> 'H100 PCIe',
    'NVIDIA H200' / 'NVIDIA GH200 480GB' -> 'H200', 'NVIDIA A100-SXM4-80GB' -> 'A100'.
    """
    name = device_name.upper()
    nvl = "NVL" in name
    if "H200" in name:
        return "H200 NVL" if nvl else "H200"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        return "H100 NVL" if nvl else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def _dtype_key(dtype: Union[torch.dtype, str]) -> str:
    key = _DTYPE_NAMES.get(dtype if isinstance(dtype, torch.dtype) else str(dtype).lower())
    if key is None:
        raise ValueError(f"dtype={dtype!r} is not one of bf16, fp16, fp8, tf32, fp32.")
    return key


def device_peak_flops(
    dtype: Union[torch.dtype, str] = torch.bfloat16,
    device_name: Optional[str] = None,
) -> Optional[float]:
    """Peak dense FLOP/s of this process's device for matmuls in `dtype`; None if unknown.

    Order: the env override `SPANNORM_PEAK_TFLOPS` (TFLOP/s of one device, any device); the
    table above for NVIDIA GPUs, picked from `device_name` (default: torch.cuda.get_device_name
    of the current device); None for an unknown GPU (MFU is then not logged); on CPU a rough
    estimate (`cpu_peak_flops`). A float32 dtype counts as TF32 on a GPU when
    `torch.backends.cuda.matmul.allow_tf32` is on.
    """
    override = os.environ.get(PEAK_TFLOPS_ENV, "").strip()
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(
                f"{PEAK_TFLOPS_ENV}={override!r} is not a number of TFLOP/s.") from None
        if not value > 0:
            raise ValueError(f"{PEAK_TFLOPS_ENV}={override!r} must be positive (TFLOP/s).")
        return value * 1e12

    key = _dtype_key(dtype)
    if device_name is None:
        from spannorm_megatron.runtime import has_accelerator

        if not has_accelerator():
            return cpu_peak_flops(dtype)
        device_name = torch.cuda.get_device_name(torch.cuda.current_device())
    model = gpu_model(device_name)
    if model is None:
        return None
    if key == "fp32" and getattr(torch.backends.cuda.matmul, "allow_tf32", False):
        key = "tf32"
    tflops = PEAK_TFLOPS[model][key]
    if tflops is None:
        raise ValueError(f"{model} has no {key} tensor cores: no peak to compare against.")
    return tflops * 1e12


def cpu_peak_flops(dtype: Union[torch.dtype, str] = torch.float32) -> float:
    """Rough peak FLOP/s of the CPU threads this process uses (indicative only).

    threads (torch.get_num_threads()) x clock (/proc/cpuinfo, else 2.5 GHz) x FLOPs per cycle
    per core: 64 with AVX-512 (two 16-lane FMA units), 32 with AVX2+FMA, 8 otherwise; bf16
    with AVX512_BF16 counts double. Turbo clocks, shared cores between ranks, memory
    bandwidth and AMX are ignored, so CPU MFU is a trend indicator, not a hardware figure;
    set SPANNORM_PEAK_TFLOPS for a measured value.
    """
    flags, mhz = _cpuinfo()
    if "avx512f" in flags:
        per_cycle = 64
    elif "avx2" in flags and "fma" in flags:
        per_cycle = 32
    else:
        per_cycle = 8
    try:
        is_bf16 = _dtype_key(dtype) == "bf16"
    except ValueError:
        is_bf16 = False
    if is_bf16 and "avx512_bf16" in flags:
        per_cycle *= 2
    ghz = mhz / 1000.0 if mhz else 2.5
    return torch.get_num_threads() * ghz * 1e9 * per_cycle


def _cpuinfo():
    flags, mhz = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("cpu MHz") and mhz is None:
                    match = re.search(r"[\d.]+", line.split(":", 1)[1])
                    mhz = float(match.group()) if match else None
                if flags and mhz is not None:
                    break
    except OSError:
        pass
    if mhz is not None and not math.isfinite(mhz):
        mhz = None
    return flags, mhz


@dataclass(frozen=True)
class Throughput:
    """One iteration's speed: global tokens/s, achieved TFLOP/s per device and MFU."""

    tokens_per_second: float
    tflops_per_device: Optional[float]
    """Model TFLOP/s per device (Megatron-LM's 'TFLOP/s/GPU': FLOPs / time / world size)."""
    mfu: Optional[float]


def throughput(
    tokens: int,
    iteration_time: float,
    *,
    flops_per_token: Optional[float] = None,
    num_devices: int = 1,
    peak_flops: Optional[float] = None,
) -> Throughput:
    """Throughput of an iteration that trained `tokens` tokens (global batch x seq length) on
    `num_devices` devices in `iteration_time` seconds. TFLOP/s needs `flops_per_token`; MFU
    needs it and `peak_flops` (one device's peak FLOP/s)."""
    if not iteration_time > 0:
        raise ValueError(f"iteration_time={iteration_time} must be positive (seconds).")
    tokens_per_second = tokens / iteration_time
    tflops = mfu_value = None
    if flops_per_token is not None:
        tflops = tokens_per_second * flops_per_token / num_devices / 1e12
        if peak_flops:
            mfu_value = mfu(tokens_per_second, flops_per_token, peak_flops, num_devices)
    return Throughput(tokens_per_second, tflops, mfu_value)
