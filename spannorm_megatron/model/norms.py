"""RMSNorm and LayerNorm for the local (PyTorch) flavour.

megatron-core's local spec uses `WrappedTorchNorm`, which refuses sequence parallelism, and MoE
with tensor parallelism requires sequence parallelism. These norms work under it: with sequence
parallelism each tensor-parallel rank normalizes its own slice of the sequence, so the gains'
gradients are partial sums; marking the gains `sequence_parallel` makes megatron-core's
`finalize_model_grads` all-reduce them over the tensor-parallel group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


def _parameter_device(config: TransformerConfig) -> Optional[torch.device]:
    # Follow megatron-core's linear layers: allocate on the GPU unless told to initialize on CPU,
    # and then on the default device (the host, or meta inside `with torch.device("meta")`).
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return None


class _Norm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float, with_bias: bool):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        # apply_layernorm_1p: the stored gain is (gain - 1), so weight decay pulls the gain to 1.
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        factory = dict(device=_parameter_device(config), dtype=config.params_dtype)
        initial = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(initial(hidden_size, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, **factory)) if with_bias else None
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def gain(self) -> torch.Tensor:
        return self.weight + 1 if self.zero_centered_gamma else self.weight

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class RMSNorm(_Norm):
    """y = x / sqrt(mean(x^2) + eps) * g over the last dimension."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps, with_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.gain(), self.eps)


class LayerNorm(_Norm):
    """y = (x - mean) / sqrt(var + eps) * g + b over the last dimension."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps, with_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.gain(), self.bias, self.eps)


class Norm:
    """Builds the RMSNorm or LayerNorm that `config.normalization` names, like megatron's TENorm,
    so one spec entry serves both norm types."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        if config.normalization == "RMSNorm":
            return RMSNorm(config, hidden_size, eps)
        if config.normalization == "LayerNorm":
            return LayerNorm(config, hidden_size, eps)
        raise ValueError(
            f"normalization={config.normalization!r} is not supported: use RMSNorm or LayerNorm."
        )
