"""What a run does when the collapse alarm or a loss spike fires: go on as before, or roll back to
the last checkpoint saved before the event and change course (`training/rollback.py`).

PaLM, OPT and BLOOM did this by hand: restart some steps before the event with a lower learning
rate, and skip the batches that led to it. The defaults keep the run's behaviour without these
flags: the alarm warns, a spike is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from spannorm_megatron.config.options import check, option
from spannorm_megatron.errors import ConfigError

AUTO = "auto"


def parse_skip_batches(value: Union[str, int]) -> Union[str, int]:
    """--rollback-skip-batches: `auto` or a number of global batches >= 0."""
    if isinstance(value, str) and value == AUTO:
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not understood: use {AUTO} or a number of batches "
                         f">= 0") from None
    if isinstance(value, bool) or number < 0 or str(number) != str(value).strip():
        raise ValueError(f"{value!r} must be {AUTO} or a whole number of batches >= 0")
    return number


@dataclass
class RollbackConfig:
    """When the collapse alarm or a loss spike fires: warn and train on, or roll back."""

    on_collapse: str = option(
        "warn", "When the collapse alarm (--collapse-grad-ratio) fires: warn and train on, or "
        "roll back to the newest checkpoint saved before the layer-2/L gradient ratio began "
        "the fall that crossed the threshold, and go on from there on a changed course "
        "(--rollback-lr-factor, --rollback-extra-warmup-iters, --rollback-skip-batches).",
        choices=("warn", "rollback"))
    on_loss_spike: str = option(
        "skip", "When a loss spike (--loss-spike-factor) is seen: log it and train on past it "
        "(the step's update is kept, as without this flag), or roll back to the newest "
        "checkpoint saved before the spiking iteration and change course as --on-collapse "
        "rollback does.", choices=("skip", "rollback"))
    rollback_lr_factor: float = option(
        0.5, "Each rollback multiplies the learning rate of the rest of the run (every "
        "parameter group, peak and floor alike) by this factor, in (0, 1].", above=0.0)
    rollback_extra_warmup_iters: Optional[int] = option(
        None, "After a rollback, the learning rate climbs again from 0 to its (lowered) "
        "schedule over this many iterations (linearly, as --lr-warmup-iters does); unset: the "
        "run's own warm-up length.", at_least=0)
    rollback_skip_batches: Union[str, int] = option(
        AUTO, "Global batches a rollback skips after the rollback point: auto = every batch "
        "between the rollback point and the event (the ones that led to it), or a number. "
        "The data order stays deterministic: the same command and seed roll back the same "
        "way.", parse=parse_skip_batches, metavar="{auto,N}")
    max_rollbacks: int = option(
        3, "Rollbacks one run may make; at the next event past it the run stops with exit "
        "code 1, keeping every checkpoint.", at_least=0)
    rollback_snapshot_interval: int = option(
        0, "Every this many iterations each rank also copies its own training state (weights, "
        "optimizer state, scheduler, RNG, data position) into host memory, keeping the newest "
        "2 copies: a rollback goes back to the newest copy before the event when it is newer "
        "than the newest checkpoint before it (for checkpoints too sparse to roll back to). "
        "0: off, rollbacks go to checkpoints only.", at_least=0)

    def __post_init__(self) -> None:
        check(self)
        if self.rollback_lr_factor > 1:
            raise ConfigError(
                f"--rollback-lr-factor {self.rollback_lr_factor:g} is above 1: a rollback "
                f"lowers the learning rate or keeps it. Give a factor in (0, 1], e.g. 0.5.")
        if self.enabled and self.max_rollbacks < 1:
            raise ConfigError(
                f"--max-rollbacks {self.max_rollbacks} with {self.policy_flags()}: the run "
                f"could never roll back. Give --max-rollbacks 1 or more, or drop the rollback "
                f"policy.")
        if self.rollback_snapshot_interval and not self.enabled:
            raise ConfigError(
                f"--rollback-snapshot-interval {self.rollback_snapshot_interval} without a "
                f"rollback policy: the snapshots are rollback points, and nothing would roll "
                f"back. Add --on-collapse rollback or --on-loss-spike rollback, or drop "
                f"--rollback-snapshot-interval.")

    @property
    def enabled(self) -> bool:
        """Whether any event rolls the run back."""
        return self.on_collapse == "rollback" or self.on_loss_spike == "rollback"

    def policy_flags(self) -> str:
        """The flags that turned rollbacks on, as the user wrote them."""
        given = [f"--on-collapse {self.on_collapse}" if self.on_collapse == "rollback" else "",
                 f"--on-loss-spike {self.on_loss_spike}" if self.on_loss_spike == "rollback"
                 else ""]
        return " and ".join(flag for flag in given if flag)
