"""What a training run does beside the model, data and layout: the optimizer and its schedule,
the run's length and guards, logging, evaluation and checkpoints. Each field is a
`spannorm-train` flag, named as in Megatron-LM (`spannorm_megatron.config.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.config.options import SEED, check, option
from spannorm_megatron.errors import ConfigError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@dataclass
class TrainingConfig:
    """Batch, optimizer, learning-rate schedule, seed, and when a run stops."""

    micro_batch_size: int = option(4, "Samples per micro-batch on each data-parallel rank.",
                                   at_least=1, required=True)
    global_batch_size: Optional[int] = option(
        None, "Samples per optimizer step over all data-parallel ranks (gradient accumulation "
        "makes up the rest); unset: micro batch x data-parallel size.", at_least=1)
    rampup_batch_size: Optional[List[int]] = option(
        None, "Grow the global batch: start size, increment, ramp-up samples (e.g. '16 16 "
        "5859375'), as megatron-core's micro-batch calculator does; needs --train-samples.",
        nargs=3)
    train_iters: Optional[int] = option(
        None, "Optimizer steps of the whole run (or give --train-samples).", at_least=1)
    train_samples: Optional[int] = option(
        None, "Samples of the whole run, counted over all data-parallel ranks (or give "
        "--train-iters); the learning-rate schedule then counts samples.", at_least=1)
    lr: Optional[float] = option(None, "Peak learning rate.", above=0.0, required=True)
    min_lr: float = option(0.0, "Learning rate at the end of the decay.", at_least=0.0)
    lr_decay_style: str = option("linear", "Decay after the warm-up.", choices=LR_DECAY_STYLES)
    lr_warmup_fraction: Optional[float] = option(
        None, "Warm-up as a fraction of the decay steps (instead of --lr-warmup-iters or "
        "--lr-warmup-samples).", at_least=0.0, below=1.0)
    lr_warmup_iters: int = option(0, "Steps of linear warm-up from --lr-warmup-init to --lr.",
                                  at_least=0)
    lr_warmup_samples: int = option(0, "Sample-based training: samples of warm-up.", at_least=0)
    lr_warmup_init: float = option(0.0, "Learning rate the warm-up starts from.", at_least=0.0)
    lr_decay_iters: Optional[int] = option(
        None, "Steps over which the learning rate decays (warm-up included); unset: "
        "--train-iters.", at_least=1)
    lr_decay_samples: Optional[int] = option(
        None, "Sample-based training: samples over which the learning rate decays; unset: "
        "--train-samples.", at_least=1)
    lr_wsd_decay_iters: Optional[int] = option(
        None, "WSD: steps of the final decay phase.", at_least=1)
    lr_wsd_decay_samples: Optional[int] = option(
        None, "WSD, sample-based training: samples of the final decay phase.", at_least=1)
    decoupled_lr: Optional[float] = option(
        None, "Peak learning rate of the input embedding and output layer (megatron-core's "
        "decoupled learning rate; they follow the same schedule); unset: --lr.", above=0.0)
    decoupled_min_lr: Optional[float] = option(
        None, "With --decoupled-lr: the embedding and output layer's learning rate at the end "
        "of the decay; unset: --min-lr.", at_least=0.0)
    clip_grad: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).",
                              at_least=0.0)
    calculate_per_token_loss: bool = option(
        False, "Gradient of the token-weighted mean loss over all micro-batches and "
        "data-parallel ranks (default, as in Megatron-LM: the mean of each micro-batch's token "
        "mean). The logged loss is token-weighted either way.")
    weight_decay: float = option(0.01, "AdamW weight decay.", at_least=0.0)
    adam_beta1: float = option(0.9, "Adam's first-moment decay.", at_least=0.0, below=1.0)
    adam_beta2: float = option(0.999, "Adam's second-moment decay.", at_least=0.0, below=1.0)
    adam_eps: float = option(1e-8, "Adam's epsilon.", above=0.0)
    seed: int = option(1234, "Seeds initialization, dropout and the data shuffles.",
                       **SEED)
    exit_interval: Optional[int] = option(
        None, "Save (if --save) and exit at iterations divisible by this.", at_least=1)
    exit_duration_in_mins: Optional[int] = option(
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
    distributed_timeout_minutes: int = option(
        10, "Timeout of every process group: a collective that waits longer fails instead of "
        "hanging.", at_least=1)

    def __post_init__(self) -> None:
        check(self)
        if self.lr is None:
            raise ConfigError("--lr (the peak learning rate) is required, as in Megatron-LM.")
        self._check_run_length()
        unit = "iters" if self.train_iters is not None else "samples"
        warmup, decay, wsd = (getattr(self, f"lr_warmup_{unit}"), self.decay_length,
                              getattr(self, f"lr_wsd_decay_{unit}"))
        if self.lr_warmup_fraction is None and warmup >= decay:
            raise ConfigError(
                f"--lr-warmup-{unit} {warmup} must be smaller than --lr-decay-{unit} {decay} "
                f"(default: --train-{unit}): shorten the warm-up or decay longer.")
        if self.lr_decay_style == "WSD" and not (wsd and wsd <= decay):
            raise ConfigError(
                f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} N, the final decay phase, at "
                f"most --lr-decay-{unit} = {decay}.")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ConfigError("--override-opt-param-scheduler and "
                              "--use-checkpoint-opt-param-scheduler contradict each other: "
                              "pass one.")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} is above --lr {self.lr}: the schedule "
                              f"decays from --lr to --min-lr.")
        if self.lr_warmup_init > self.lr:  # megatron-core's scheduler asserts it
            raise ConfigError(f"--lr-warmup-init {self.lr_warmup_init} is above --lr {self.lr}: "
                              f"the warm-up rises from --lr-warmup-init to --lr.")
        if self.decoupled_min_lr is not None and self.decoupled_lr is None:
            # megatron-core reads it only beside --decoupled-lr; alone it would change nothing.
            raise ConfigError("--decoupled-min-lr needs --decoupled-lr (the embedding and output "
                              "layer's peak learning rate): add it, or drop --decoupled-min-lr.")
        if self.decoupled_lr is not None:
            low = self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr
            if low > self.decoupled_lr:
                raise ConfigError(
                    f"the embedding and output layer's learning rate would decay from "
                    f"--decoupled-lr {self.decoupled_lr} up to "
                    f"{'--decoupled-min-lr' if self.decoupled_min_lr is not None else '--min-lr'}"
                    f" {low}: give a --decoupled-min-lr at most --decoupled-lr.")

    def _check_run_length(self) -> None:
        """Megatron-LM's rules: a run is counted in iterations or in samples, and every
        schedule flag in the same unit."""
        if (self.train_iters is None) == (self.train_samples is None):
            raise ConfigError(
                "Give the run's length as --train-iters N or as --train-samples N (Megatron-LM "
                "requires exactly one of them)" + (
                    "." if self.train_iters is None else ", not both."))
        by_iters = self.train_iters is not None
        other = [flag for flag, value in (
            ("--lr-decay-samples", self.lr_decay_samples),
            ("--lr-warmup-samples", self.lr_warmup_samples),
            ("--lr-wsd-decay-samples", self.lr_wsd_decay_samples),
            ("--rampup-batch-size", self.rampup_batch_size),
        ) if value] if by_iters else [flag for flag, value in (
            ("--lr-decay-iters", self.lr_decay_iters),
            ("--lr-warmup-iters", self.lr_warmup_iters),
            ("--lr-wsd-decay-iters", self.lr_wsd_decay_iters),
        ) if value]
        if other:
            unit, mine = ("iterations", "--train-iters") if by_iters else (
                "samples", "--train-samples")
            raise ConfigError(
                f"{', '.join(other)} cannot be used with {mine}: a run counted in {unit} "
                f"counts its schedule in {unit} too (as in Megatron-LM). Use the "
                f"{'-iters' if by_iters else '-samples'} spelling.")
        warmup = self.lr_warmup_iters if by_iters else self.lr_warmup_samples
        if self.lr_warmup_fraction is not None and warmup:
            raise ConfigError(
                f"--lr-warmup-fraction and --lr-warmup-{'iters' if by_iters else 'samples'} "
                f"both set the warm-up: give one.")
        if self.rampup_batch_size is not None and len(self.rampup_batch_size) != 3:
            raise ConfigError(
                f"--rampup-batch-size takes three numbers (start batch size, increment, ramp-up "
                f"samples), got {self.rampup_batch_size}.")

    @property
    def decay_length(self) -> int:
        """The decay in the run's unit: --lr-decay-iters/samples, or the whole run."""
        if self.train_iters is not None:
            return self.lr_decay_iters or self.train_iters
        return self.lr_decay_samples or self.train_samples

    def scheduler_samples(self, global_batch_size: int) -> dict:
        """Megatron-LM's `get_optimizer_param_scheduler`: the schedule's lengths in samples
        (its step unit, so a schedule survives a change of batch size)."""
        per = global_batch_size if self.train_iters is not None else 1
        unit = "iters" if self.train_iters is not None else "samples"
        decay = self.decay_length * per
        warmup = (self.lr_warmup_fraction * decay if self.lr_warmup_fraction is not None
                  else getattr(self, f"lr_warmup_{unit}") * per)
        wsd = getattr(self, f"lr_wsd_decay_{unit}")
        return dict(lr_warmup_steps=warmup, lr_decay_steps=decay,
                    wd_incr_steps=(self.train_iters * per if self.train_iters is not None
                                   else self.train_samples),
                    wsd_decay_steps=wsd * per if wsd else None)
