"""Training metrics: model FLOPs and MFU, per-layer stability signals, MoE routing metrics,
memory, and the TensorBoard writer that records them with Megatron-LM's tag names.

One module per job:

- `flops`       FLOPs per token / iteration from a ModelConfig, device peak FLOP/s, MFU
- `stability`   per-layer activation RMS, gradient norm and update ratio (forward hooks, on
                logging steps only), reduced over all parallel groups
- `collapse`    the collapse alarm: warns once when the lower layers stop receiving gradient
- `moe`         load-balancing loss (megatron-core's tracker) and per-expert load
- `memory`      allocator (GPU) or RSS (CPU) numbers for the mem-* tags
- `params_norm` the L2 norm of all parameters (--log-params-norm), as Megatron-LM computes it
- `tensorboard` the writer (one rank writes; the others get a no-op)
"""

from spannorm_megatron.metrics.collapse import CollapseAlarm, CollapseReport
from spannorm_megatron.metrics.flops import (
    ForwardFlops,
    Throughput,
    device_peak_flops,
    flops_per_iteration,
    flops_per_token,
    forward_flops,
    mfu,
    throughput,
)
from spannorm_megatron.metrics.memory import memory_stats
from spannorm_megatron.metrics.moe import MoEMetrics
from spannorm_megatron.metrics.stability import SIGNALS, StabilitySignals, summarize
from spannorm_megatron.metrics.tensorboard import TensorBoardWriter, is_writer_rank

__all__ = [
    "CollapseAlarm",
    "CollapseReport",
    "ForwardFlops",
    "MoEMetrics",
    "SIGNALS",
    "StabilitySignals",
    "TensorBoardWriter",
    "Throughput",
    "device_peak_flops",
    "flops_per_iteration",
    "flops_per_token",
    "forward_flops",
    "is_writer_rank",
    "memory_stats",
    "mfu",
    "summarize",
    "throughput",
]
