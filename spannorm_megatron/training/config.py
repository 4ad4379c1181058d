"""What a training run does beside the model, data and layout: the optimizer and its schedule,
the run's length and guards, logging, evaluation and checkpoints. Each field is a
`spannorm-train` flag, named as in Megatron-LM (`spannorm_megatron.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spannorm_megatron.errors import ConfigError
from spannorm_megatron.options import check, option

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@dataclass
class TrainingConfig:
    """Batch, optimizer, learning-rate schedule, seed, and when a run stops."""

    micro_batch_size: int = option(4, "Samples per micro-batch on each data-parallel rank.",
                                   at_least=1)
    global_batch_size: Optional[int] = option(
        None, "Samples per optimizer step over all data-parallel ranks (gradient accumulation "
        "makes up the rest); unset: micro batch x data-parallel size.", at_least=1)
    train_iters: int = option(100, "Optimizer steps of the whole run.", at_least=1)
    lr: float = option(3e-4, "Peak learning rate.", above=0.0)
    min_lr: float = option(0.0, "Learning rate at the end of the decay.", at_least=0.0)
    lr_decay_style: str = option("cosine", "Decay after the warm-up.", choices=LR_DECAY_STYLES)
    lr_warmup_iters: int = option(0, "Steps of linear warm-up from 0 to --lr.", at_least=0)
    lr_decay_iters: Optional[int] = option(
        None, "Steps over which the learning rate decays (warm-up included).", at_least=1,
        fallback="--train-iters")
    lr_wsd_decay_iters: Optional[int] = option(
        None, "WSD: steps of the final decay phase.", at_least=1)
    clip_grad: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).",
                              at_least=0.0)
    calculate_per_token_loss: bool = option(
        False, "Gradient of the token-weighted mean loss over all micro-batches and "
        "data-parallel ranks (default, as in Megatron-LM: the mean of each micro-batch's token "
        "mean). The logged loss is token-weighted either way.")
    weight_decay: float = option(0.01, "AdamW weight decay.", at_least=0.0)
    adam_beta1: float = option(0.9, "Adam's first-moment decay.", at_least=0.0, below=1.0)
    adam_beta2: float = option(0.95, "Adam's second-moment decay.", at_least=0.0, below=1.0)
    adam_eps: float = option(1e-8, "Adam's epsilon.", above=0.0)
    seed: int = option(1234, "Seeds initialization, dropout and the data shuffles.",
                       at_least=0)
    exit_interval: Optional[int] = option(
        None, "Save (if --save) and exit at iterations divisible by this.", at_least=1)
    exit_duration_in_mins: Optional[float] = option(
        None, "Save (if --save) and exit once this run has lasted this long.", above=0.0)
    max_skipped_iterations: int = option(
        5, "Stop after this many steps in a row with NaN/Inf gradients (each such step is "
        "skipped: no update).", at_least=1)
    loss_spike_factor: float = option(
        1.5, "Log a loss spike when the loss exceeds this x the running median.", above=1.0)
    loss_spike_window: int = option(
        50, "Iterations in the running median of --loss-spike-factor.", at_least=1)
    override_opt_param_scheduler: bool = option(
        False, "On resume, take this run's learning-rate schedule flags over the checkpoint's "
        "(the step count continues from the checkpoint).")
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "On resume, keep the checkpoint's learning-rate schedule even where this run's "
        "flags differ (without either flag a difference is refused).")
    distributed_backend: Optional[str] = option(
        None, "Default process group backend; unset: nccl on GPUs, gloo on CPU (the only "
        "pairs that run).", choices=("nccl", "gloo"))

    def __post_init__(self) -> None:
        check(self)
        decay = self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters
        if self.lr_warmup_iters >= decay:
            raise ConfigError(
                f"--lr-warmup-iters {self.lr_warmup_iters} must be smaller than --lr-decay-iters "
                f"{decay} (default: --train-iters): shorten the warm-up or decay longer.")
        if self.lr_decay_style == "WSD" and not (
                self.lr_wsd_decay_iters and self.lr_wsd_decay_iters <= decay - self.lr_warmup_iters):
            raise ConfigError(
                f"--lr-decay-style WSD needs --lr-wsd-decay-iters N, the final decay phase, at "
                f"most --lr-decay-iters - --lr-warmup-iters = {decay - self.lr_warmup_iters}.")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt-param-scheduler and "
                              "--use-checkpoint-opt-param-scheduler contradict each other: "
                              "pass one.")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is above --lr {self.lr}: the schedule "
                              f"decays from --lr to --min-lr.")


@dataclass
class LoggingConfig:
    """What the run reports, and when it evaluates."""

    log_interval: int = option(10, "Iterations between log lines (and TensorBoard points).",
                               at_least=1)
    tensorboard_dir: Optional[str] = option(None, "Write TensorBoard events here.",
                                            path="output")
    eval_interval: int = option(100, "Iterations between evaluations.", at_least=1)
    eval_iters: int = option(10, "Batches of each evaluation (0: no evaluation).", at_least=0)
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
class CheckpointConfig:
    """Where checkpoints go and what a resume restores."""

    save: Optional[str] = option(None, "Write checkpoints here (iter_XXXXXXX/ directories).",
                                 path="output")
    load: Optional[str] = option(None, "Resume from the latest checkpoint here, if any.")
    save_interval: Optional[int] = option(None, "Iterations between checkpoints (and one at "
                                          "the end).", at_least=1)
    no_load_optim: bool = option(False, "Resume the weights only, with a fresh optimizer.")
    no_load_rng: bool = option(False, "Do not restore the random-number generators.")
    load_fallback: bool = option(
        False, "If the latest checkpoint is damaged, load the newest earlier complete one "
        "instead of stopping with an error.")
    use_checkpoint_args: bool = option(
        False, "Take the model's flags from the --load checkpoint (Megatron-LM's flag): its "
        "sizes where the command line leaves them unset, its structure, norm, position "
        "embeddings, dropout, MoE settings (and tokenizer, see the next flag) over the command "
        "line. Not the parallel layout.")
    use_tokenizer_model_from_checkpoint_args: bool = option(
        True, "With --use-checkpoint-args, take --tokenizer-type and --tokenizer-model from the "
        "checkpoint too (Megatron-LM's flag; --no-use-tokenizer-model-from-checkpoint-args "
        "keeps the command line's).")

    def __post_init__(self) -> None:
        check(self)
