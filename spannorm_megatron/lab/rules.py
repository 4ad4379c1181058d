"""Training's rules, as the lab applies them to runs that have finished: the lab reads them
here instead of restating them.

- a *collapse*: the layer-2/L gradient-norm ratio below the collapse alarm's threshold, the
  default of `--collapse-grad-ratio` (`metrics.collapse` fires on it during training);
- a *loss spike*: `training.spikes`' rule with the defaults of `--loss-spike-factor` and
  `--loss-spike-window`, the guard's (over logged losses: a run that logs every iteration is
  judged exactly as its guard judged it).

The defaults are read from the flags' declarations, so changing a flag's default changes what
the lab counts.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

from spannorm_megatron.config.logging import LoggingConfig
from spannorm_megatron.config.training import TrainingConfig
from spannorm_megatron.training.spikes import find_spikes


def _declared_default(owner, name: str):
    return next(f.default for f in dataclasses.fields(owner) if f.name == name)


def collapse_threshold() -> float:
    """The collapse alarm's default threshold (--collapse-grad-ratio)."""
    return _declared_default(LoggingConfig, "collapse_grad_ratio")


def spike_factor() -> float:
    return _declared_default(TrainingConfig, "loss_spike_factor")


def spike_window() -> int:
    return _declared_default(TrainingConfig, "loss_spike_window")


def loss_spikes(iterations: Sequence[int], losses: Sequence[Optional[float]]) -> List[int]:
    """The iterations the training guard would flag as loss spikes, at its default flags."""
    return find_spikes(iterations, losses, spike_factor(), spike_window())


__all__ = ["collapse_threshold", "loss_spikes", "spike_factor", "spike_window"]
