"""What a run reports (log lines, TensorBoard, Weights & Biases), when it evaluates, and which
metrics it computes (Megatron-LM's logging flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spannorm_megatron.config.options import check, option


@dataclass
class LoggingConfig:
    """What the run reports, and when it evaluates."""

    log_interval: int = option(
        100, "Iterations between log lines (and the points of iteration-time, throughput and "
        "our own TensorBoard tags: stability/*, moe/expert_load/*, throughput/*).", at_least=1)
    tensorboard_dir: Optional[str] = option(None, "Write TensorBoard events here.",
                                            path="output_folder")
    wandb_project: Optional[str] = option(
        None, "Log to Weights & Biases under this project (the last rank logs what Megatron-LM "
        "logs there); needs the wandb package. Unset: no W&B.")
    wandb_exp_name: Optional[str] = option(None, "The W&B run name.")
    wandb_save_dir: Optional[str] = option(
        None, "Where W&B keeps its local files; unset: <--save>/wandb.", path="output_folder")
    wandb_entity: Optional[str] = option(None, "The W&B entity (team or user) of the project.")
    eval_interval: Optional[int] = option(
        None, "Iterations between evaluations; unset: only the final one.", at_least=1)
    eval_iters: int = option(100, "Batches of each evaluation (0: no evaluation).", at_least=0)
    collapse_grad_ratio: float = option(
        1e-3, "Collapse alarm: warn once (log and TensorBoard text) at the first logging step "
        "where layer 2's parameter gradient norm is below this x the last layer's, i.e. the "
        "lower layers stop receiving gradient (models of 3 or more layers; 0: off). 1e-3 lies in "
        "the gap of the depth-sweep grid's runs: 18x above the highest minimum of those that "
        "collapsed (5.4e-5) and 2.5x below the lowest of those that did not (2.5e-3); "
        "docs/stability/collapse_alarm.md.",
        at_least=0.0, below=1.0)

    def __post_init__(self) -> None:
        check(self)


@dataclass
class MetricsLoggingConfig:
    """Which metrics a run computes and writes to TensorBoard: Megatron-LM's logging flags,
    with its defaults and meanings (spannorm_megatron/metrics/tensorboard.py lists every tag
    and the flag that gates it)."""

    tensorboard_log_interval: int = option(
        1, "Write Megatron-LM's per-iteration TensorBoard scalars (lm loss, learning-rate, "
        "batch-size, loss-scale, grad-norm, num-zeros, params-norm, world-size, mem-* and their "
        "'... vs samples' twins) at iterations divisible by this.", at_least=1)
    tensorboard_queue_size: int = option(
        1000, "TensorBoard events held in memory before a write to disk is forced.",
        at_least=1)
    log_params_norm: bool = option(
        False, "Compute the L2 norm of all parameters after each logged step: log line "
        "'params norm' and TensorBoard params-norm.")
    log_num_zeros_in_grad: bool = option(
        False, "Count the zero entries of the gradient (megatron-core's optimizer): log line "
        "'num zeros' and TensorBoard num-zeros.")
    log_throughput: bool = option(
        False, "Log line: model TFLOP/s per device ('throughput per GPU'); with "
        "--log-timers-to-tensorboard also the TensorBoard tag throughput.")
    log_timers_to_tensorboard: bool = option(
        False, "TensorBoard: iteration-time (seconds per training iteration, averaged over "
        "--log-interval) and, with --log-throughput, throughput.")
    log_loss_scale_to_tensorboard: bool = option(
        True, "TensorBoard: loss-scale (1 without fp16 loss scaling).")
    log_validation_ppl_to_tensorboard: bool = option(
        False, "TensorBoard: 'lm loss validation ppl', exp(min(20, validation loss)).")
    log_memory_to_tensorboard: bool = option(
        False, "TensorBoard: the writing rank's memory, mem-allocated-bytes, "
        "mem-max-allocated-bytes (+ mem-reserved-bytes and mem-allocated-count on GPU; CPU: "
        "resident set size, see metrics/memory.py).")
    log_world_size_to_tensorboard: bool = option(
        False, "TensorBoard: world-size, the number of ranks.")
    moe_per_layer_logging: bool = option(
        False, "TensorBoard: each MoE router loss per layer as well, "
        "moe/{load_balancing_loss,z_loss,...}_layer_{i} (i: 0-based layer index; dense layers "
        "write 0, as in Megatron-LM).")

    def __post_init__(self) -> None:
        check(self)
