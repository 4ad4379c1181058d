"""TensorBoard output of a training run, with Megatron-LM's tag names.

Why: one writer, on one rank, with the tag names people already read in Megatron-LM runs, so
dashboards and comparison scripts work unchanged; plus our per-layer stability and MoE tags.

Which rank writes: the one that holds the loss -- the last pipeline stage, tensor-parallel
rank 0, data-parallel (with context-parallel) rank 0. (Megatron-LM writes from global rank
world_size - 1, also on the last stage; any rank of the last stage has the DP-reduced loss.)
Every other rank, and every rank when no `--tensorboard-dir` is given, gets a writer whose
methods do nothing, so the training loop calls them unconditionally.

The writer never communicates. Metrics that need collectives (StabilitySignals.collect,
MoEMetrics.collect) are gathered on every rank first and then handed to the writer.

Megatron-LM's tags (megatron/training/training.py `training_log` and
`evaluate_and_print_results` of core_v0.16.1), with its names, schedule and gating flags.
"Twin" means the same value is also written as `<tag> vs samples` with the consumed training
samples as x axis (the scalars' step); every other tag has the iteration as x axis.

  every --tensorboard-log-interval iterations (default 1):
    learning-rate (+ twin)          the learning rate after the step's scheduler update, i.e.
                                    the one the next step uses (Megatron-LM's value)
    batch-size (+ twin)             global batch, samples
    lm loss (+ twin)                training LM loss (token mean over the global batch)
    loss-scale (+ twin)             --log-loss-scale-to-tensorboard (default on;
                                    --no-log-loss-scale-to-tensorboard)
    world-size (+ twin)             --log-world-size-to-tensorboard
    grad-norm (+ twin)              global gradient norm before clipping (not on skipped steps)
    num-zeros (+ twin)              --log-num-zeros-in-grad: zero gradient entries, counted by
                                    megatron-core's optimizer
    params-norm (+ twin)            --log-params-norm: L2 norm of all parameters after the
                                    step (metrics.params_norm)
    mem-reserved-bytes, mem-allocated-bytes, mem-max-allocated-bytes, mem-allocated-count
                                    --log-memory-to-tensorboard: the writing rank's memory
                                    (metrics.memory; CPU: the first two only, from the RSS)
  every --log-interval iterations, not on the first iteration of a launch:
    iteration-time                  --log-timers-to-tensorboard: seconds per training
                                    iteration, averaged over the interval (evaluation and
                                    checkpoint time left out)
    throughput                      --log-timers-to-tensorboard and --log-throughput: model
                                    TFLOP/s per device, Megatron-LM's count (no recompute, no
                                    router GEMM)
  every iteration, MoE models:
    load_balancing_loss, seq_load_balancing_loss, global_load_balancing_loss, z_loss
                                    router losses (one per --moe-router-load-balancing-type,
                                    z_loss with --moe-z-loss-coeff): sum over layers / MoE layers
    moe/{name}_layer_{i}            --moe-per-layer-logging: per layer, i = 0-based layer index
                                    over all layers (dense layers: 0)
  at each evaluation:
    lm loss validation (+ twin)     validation LM loss
    lm loss validation ppl (+ twin) --log-validation-ppl-to-tensorboard: exp(min(20, loss))

Megatron-LM's `skipped-train-samples` is written only when samples are dropped to shrink a
batch (--decrease-batch-size-if-needed), which this stack never does, so it never appears, as
in Megatron-LM without that flag.

Our own tags, every --log-interval iterations (x axis = iteration):

    throughput/tokens-per-sec       global tokens per second
    throughput/tflops               TFLOP/s per device, hardware count (recompute and the MoE
                                    router GEMM included; metrics.flops)
    throughput/mfu                  model FLOPs utilization (when the device peak is known)
    skipped-iterations              steps skipped for NaN/Inf gradients so far (also whenever
                                    the count grows)
    moe/expert_load/layer_{n:03d}/expert_{e:03d}   fraction of layer n's routed tokens to e
    moe/expert_load/layer_{n:03d}/max_over_mean    load imbalance of layer n (1 = balanced)
    moe/expert_load/max_over_mean   worst layer's imbalance
    moe/dropped_token_fraction      top-k assignments dropped by the capacity limit (mean over
                                    MoE layers); moe/dropped_token_fraction/layer_{n:03d}
    moe/expert_bias/layer_{n:03d}/expert_{e:03d}   aux-loss-free expert bias after the step
    stability/layer_{n:03d}/{output_rms,attention_rms,mlp_rms,grad_norm,update_ratio}
    stability/max/{signal}          maximum over layers of each signal
    stability/grad_ratio_2_L        layer 2's gradient norm / layer L's (models of 3+ layers):
                                    what the collapse alarm watches (metrics.collapse)
    stability/{embedding,output_layer}/{grad_norm,update_ratio}   the parts outside the layers
                                    (over `grad-norm`: their share of the clipped step)

    rollback/count                  rollbacks so far (--on-collapse / --on-loss-spike rollback),
                                    at the iteration of each event
    rollback/point                  the iteration the run went back to
    rollback/lr_scale               the learning-rate factor of the course from then on (the
                                    product of every rollback's --rollback-lr-factor)
    rollback/extra_warmup_iters     iterations of the renewed warm-up
    rollback/skipped_batches        global batches skipped after the rollback point
    rollback/from_snapshot          1 when the point was a host snapshot
                                    (--rollback-snapshot-interval), 0 for a checkpoint

n is the global 1-based layer number. Text: `config` (the run's configuration),
`stability/collapse_alarm` (the collapse alarm's message, at the iteration it fired) and
`rollback/event` (what a rollback did and why, at the event's iteration).

Flushing: the event file is written by a background thread every `flush_secs` (default 30 s,
so a crash loses at most that much) or when --tensorboard-queue-size events are waiting, and
explicitly after the config, after each validation and on close().
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional, Union

import torch
from megatron.core import parallel_state

from spannorm_megatron.metrics.flops import throughput
from spannorm_megatron.metrics.moe import expert_imbalance
from spannorm_megatron.metrics.collapse import grad_ratio
from spannorm_megatron.metrics.stability import summarize

TAG_LM_LOSS = "lm loss"
TAG_VALIDATION_LOSS = "lm loss validation"
TAG_VALIDATION_PPL = "lm loss validation ppl"
TAG_LEARNING_RATE = "learning-rate"
TAG_GRAD_NORM = "grad-norm"
TAG_LOSS_SCALE = "loss-scale"
TAG_NUM_ZEROS = "num-zeros"
TAG_BATCH_SIZE = "batch-size"
TAG_ITERATION_TIME = "iteration-time"
TAG_WORLD_SIZE = "world-size"
TAG_PARAMS_NORM = "params-norm"
TAG_THROUGHPUT = "throughput"
TAG_TOKENS_PER_SEC = "throughput/tokens-per-sec"
TAG_TFLOPS = "throughput/tflops"
TAG_MFU = "throughput/mfu"
TAG_CONFIG = "config"
TAG_GRAD_RATIO = "stability/grad_ratio_2_L"
TAG_COLLAPSE_ALARM = "stability/collapse_alarm"
TAG_SKIPPED_ITERATIONS = "skipped-iterations"
TAG_ROLLBACK = "rollback/event"
ROLLBACK_SCALARS = ("count", "point", "lr_scale", "extra_warmup_iters", "skipped_batches",
                    "from_snapshot")
VS_SAMPLES = " vs samples"


def stability_tag(layer: int, signal: str) -> str:
    return f"stability/layer_{layer:03d}/{signal}"


def stability_part_tag(part: str, signal: str) -> str:
    return f"stability/{part}/{signal}"


def stability_summary_tag(signal: str) -> str:
    return f"stability/max/{signal}"


def moe_loss_layer_tag(name: str, layer: int) -> str:
    """Megatron-LM's per-layer tag: 0-based layer index (global layer number - 1)."""
    return f"moe/{name}_layer_{layer - 1}"


def expert_load_tag(layer: int, expert: int) -> str:
    return f"moe/expert_load/layer_{layer:03d}/expert_{expert:03d}"


def is_writer_rank() -> bool:
    """True on the rank that writes: last pipeline stage, TP rank 0, DP (with CP) rank 0."""
    if not torch.distributed.is_initialized():
        return True
    if not parallel_state.model_parallel_is_initialized():
        return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0)


class TensorBoardWriter:
    """A SummaryWriter on the writing rank, a no-op everywhere else (see module doc).

    Args:
        log_dir: the run's --tensorboard-dir; None disables writing on every rank.
        writer_rank: override the rank choice (default: is_writer_rank()).
        flush_secs: background flush period of the event file.
        max_queue: events buffered before a write is forced.
    """

    def __init__(self, log_dir: Optional[str], *, writer_rank: Optional[bool] = None,
                 flush_secs: int = 30, max_queue: int = 1000):
        self.log_dir = log_dir
        self._writer = None
        if log_dir is None:
            return
        if not (is_writer_rank() if writer_rank is None else writer_rank):
            return
        # Imported here: ranks that do not write need no tensorboard package.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir, flush_secs=flush_secs, max_queue=max_queue)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    # ------------------------------------------------------------------ primitives
    def add_scalar(self, tag: str, value: Optional[float], iteration: int) -> None:
        """Write one scalar (None is skipped; NaN/inf are written: they are news)."""
        if self._writer is None or value is None:
            return
        if isinstance(value, torch.Tensor):
            value = value.item()
        self._writer.add_scalar(tag, float(value), iteration)

    def add_text(self, tag: str, text: str, iteration: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, iteration)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ run-level
    def write_config(self, config: Union[str, Mapping[str, Any]], tag: str = TAG_CONFIG) -> None:
        """The run's configuration as TensorBoard text (a mapping is written as JSON).

        Indented four spaces, so TensorBoard's markdown shows it verbatim as a code block.
        """
        if self._writer is None:
            return
        if not isinstance(config, str):
            config = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.add_text(tag, "\n".join("    " + line for line in config.splitlines()))
        self.flush()

    def add_scalar_and_twin(self, tag: str, value: Optional[float], iteration: int,
                            consumed_samples: int) -> None:
        """`tag` at `iteration` and `tag vs samples` at `consumed_samples` (Megatron-LM's
        pairs); None writes neither."""
        self.add_scalar(tag, value, iteration)
        self.add_scalar(tag + VS_SAMPLES, value, consumed_samples)

    def log_training(
        self,
        iteration: int,
        consumed_samples: int,
        *,
        lm_loss: Optional[float],
        learning_rate: Optional[float],
        batch_size: int,
        loss_scale: Optional[float] = None,
        world_size: Optional[int] = None,
        grad_norm: Optional[float] = None,
        num_zeros: Optional[float] = None,
        params_norm: Optional[float] = None,
        memory: Optional[Mapping[str, float]] = None,
    ) -> None:
        """Megatron-LM's per-iteration scalars, each with its `vs samples` twin (memory
        without), in its order. The caller decides what its flags turn off by passing None;
        `batch_size` is the global batch in samples, `memory` metrics.memory_stats()."""
        if self._writer is None:
            return
        self.add_scalar_and_twin(TAG_LEARNING_RATE, learning_rate, iteration, consumed_samples)
        self.add_scalar_and_twin(TAG_BATCH_SIZE, batch_size, iteration, consumed_samples)
        self.add_scalar_and_twin(TAG_LM_LOSS, lm_loss, iteration, consumed_samples)
        self.add_scalar_and_twin(TAG_LOSS_SCALE, loss_scale, iteration, consumed_samples)
        self.add_scalar_and_twin(TAG_WORLD_SIZE, world_size, iteration, consumed_samples)
        self.add_scalar_and_twin(TAG_GRAD_NORM, grad_norm, iteration, consumed_samples)
        self.add_scalar_and_twin(TAG_NUM_ZEROS, num_zeros, iteration, consumed_samples)
        self.add_scalar_and_twin(TAG_PARAMS_NORM, params_norm, iteration, consumed_samples)
        for tag, value in (memory or {}).items():
            self.add_scalar(tag, value, iteration)

    def log_timers(self, iteration: int, *, iteration_time: float,
                   throughput_tflops: Optional[float] = None) -> None:
        """Megatron-LM's timing tags (--log-timers-to-tensorboard): `iteration-time` in
        seconds and, with --log-throughput, `throughput` in TFLOP/s per device."""
        self.add_scalar(TAG_ITERATION_TIME, iteration_time, iteration)
        self.add_scalar(TAG_THROUGHPUT, throughput_tflops, iteration)

    def log_speed(self, iteration: int, *, tokens_per_step: int, iteration_time: float,
                  flops_per_token: Optional[float] = None, num_devices: int = 1,
                  peak_flops: Optional[float] = None) -> None:
        """Our throughput tags: tokens/s, TFLOP/s per device (needs `flops_per_token`,
        metrics.flops) and MFU (needs `peak_flops`, device_peak_flops(); None skips it)."""
        if self._writer is None:
            return
        speed = throughput(tokens_per_step, iteration_time, flops_per_token=flops_per_token,
                           num_devices=num_devices, peak_flops=peak_flops)
        self.add_scalar(TAG_TOKENS_PER_SEC, speed.tokens_per_second, iteration)
        self.add_scalar(TAG_TFLOPS, speed.tflops_per_device, iteration)
        self.add_scalar(TAG_MFU, speed.mfu, iteration)

    def log_validation(self, iteration: int, lm_loss: float, consumed_samples: int = 0, *,
                       ppl: bool = False) -> None:
        """Validation loss (+ twin) and, with `ppl` (--log-validation-ppl-to-tensorboard),
        perplexity exp(min(20, loss)) (+ twin), as Megatron-LM; flushes."""
        if self._writer is None:
            return
        self.add_scalar_and_twin(TAG_VALIDATION_LOSS, lm_loss, iteration, consumed_samples)
        if ppl:
            self.add_scalar_and_twin(TAG_VALIDATION_PPL, math.exp(min(20.0, float(lm_loss))),
                                     iteration, consumed_samples)
        self.flush()

    def log_stability(self, iteration: int, signals: Dict[str, Dict[int, float]],
                      parts: Optional[Dict[str, Dict[str, float]]] = None) -> None:
        """StabilitySignals.collect() output: one tag per layer and signal, plus the maxima;
        and its `parts` (embedding, output layer), one tag per part and signal."""
        if self._writer is None:
            return
        for part, values in (parts or {}).items():
            for signal, value in values.items():
                self.add_scalar(stability_part_tag(part, signal), value, iteration)
        for signal, per_layer in signals.items():
            for layer, value in sorted(per_layer.items()):
                self.add_scalar(stability_tag(layer, signal), value, iteration)
        for signal, value in summarize(signals).items():
            self.add_scalar(stability_summary_tag(signal), value, iteration)
        layers = signals.get("grad_norm") or {}
        if layers:
            self.add_scalar(TAG_GRAD_RATIO, grad_ratio(signals, max(layers)), iteration)

    def log_collapse_alarm(self, iteration: int, message: str) -> None:
        """The collapse alarm's message as text (metrics.collapse); flushed at once, since a
        collapsed run is the one most likely to be stopped by hand soon after."""
        if self._writer is None:
            return
        self.add_text(TAG_COLLAPSE_ALARM, message, iteration)
        self.flush()

    def log_rollback(self, iteration: int, values: Mapping[str, float], message: str) -> None:
        """One rollback (training.rollback) at its event's iteration: `values` holds each of
        ROLLBACK_SCALARS, `message` what the log says; flushed at once, as the alarm is."""
        if self._writer is None:
            return
        for name in ROLLBACK_SCALARS:
            self.add_scalar(f"rollback/{name}", values[name], iteration)
        self.add_text(TAG_ROLLBACK, message, iteration)
        self.flush()

    def log_moe(self, iteration: int, metrics: Dict[str, Any], *,
                per_layer_losses: bool = True) -> None:
        """MoEMetrics.collect() or collect_losses() output: router losses (mean; per layer
        with `per_layer_losses`, i.e. --moe-per-layer-logging), expert load, dropped tokens,
        expert bias."""
        if self._writer is None or not metrics:
            return
        worst = None
        for name, value in metrics.items():
            if name == "expert_load":
                for layer, load in sorted(value.items()):
                    for expert, fraction in enumerate(load):
                        self.add_scalar(expert_load_tag(layer, expert), fraction, iteration)
                    imbalance = expert_imbalance(load)
                    self.add_scalar(f"moe/expert_load/layer_{layer:03d}/max_over_mean",
                                    imbalance, iteration)
                    if imbalance is not None:
                        worst = imbalance if worst is None else max(worst, imbalance)
            elif name == "expert_bias":
                for layer, values in sorted(value.items()):
                    for expert, bias in enumerate(values):
                        self.add_scalar(f"moe/expert_bias/layer_{layer:03d}/expert_{expert:03d}",
                                        bias, iteration)
            elif name == "dropped_token_fraction":
                self.add_scalar("moe/dropped_token_fraction", value, iteration)
            elif name == "dropped_token_fraction_per_layer":
                for layer, fraction in sorted(value.items()):
                    self.add_scalar(f"moe/dropped_token_fraction/layer_{layer:03d}", fraction,
                                    iteration)
            elif name.endswith("_per_layer"):
                if per_layer_losses:
                    base = name[: -len("_per_layer")]
                    for layer, loss in sorted(value.items()):
                        self.add_scalar(moe_loss_layer_tag(base, layer), loss, iteration)
            else:
                self.add_scalar(name, value, iteration)
        self.add_scalar("moe/expert_load/max_over_mean", worst, iteration)
