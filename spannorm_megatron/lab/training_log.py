"""What a `spannorm-train` run did, from its log or its TensorBoard events, and a verdict:
final losses, divergence, the first loss spike, the gradient-norm history.

Inputs (either one):

- the text log (stdout) of `spannorm-train`; its lines are Megatron-LM's:

      [2026-01-01 12:00:00] iteration       10/     300 | consumed samples: ... |
        learning rate: 1.0E-03 | ... | lm loss: 6.282000E+00 | grad norm: 0.901 | ...
      validation loss at iteration 100 | lm loss value: 4.1E+00 | lm loss PPL: 6.0E+01 |

  Values "nan"/"NAN"/"inf"/"INF" are read as such; "n/a" (no loss on this rank) as missing.
- a `--tensorboard-dir` with the tags `lm loss`, `grad-norm` and `lm loss validation`.

Definitions (applied to the logged training losses, in iteration order; a run logs every
`--log-interval` iterations and at the last one):

- **start loss**: the first logged training loss.
- **diverged**: a logged training or validation loss, or a grad norm, is NaN/Inf; or the
  final logged training loss is above the start loss.
- **loss spike**: training's own rule (`training.spikes`, the guard's, at the defaults of
  --loss-spike-factor and --loss-spike-window, read by `lab.rules`): a finite logged training
  loss greater than factor times the median of the last `window` finite logged losses before
  it, judged once `training.spikes.WARMUP` of them have been logged. NaN/Inf losses are not
  spikes (they make the run *diverged*). `first_spike_iteration` is the iteration of the
  first spike, `num_spikes` how many there are.
- **crashed**: the process ended with a non-zero exit code (when the caller knows it), or the
  run never reached its last iteration.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from statistics import median
from typing import Dict, List, Optional, Sequence

from spannorm_megatron.lab.rules import loss_spikes
from spannorm_megatron.training.log_format import parse_lines


@dataclass
class RunHistory:
    """The logged values of one run, in iteration order."""

    iterations: List[int] = field(default_factory=list)
    train_loss: List[Optional[float]] = field(default_factory=list)
    grad_norm: List[Optional[float]] = field(default_factory=list)
    learning_rate: List[Optional[float]] = field(default_factory=list)
    step_ms: List[Optional[float]] = field(default_factory=list)
    valid_iterations: List[int] = field(default_factory=list)
    valid_loss: List[Optional[float]] = field(default_factory=list)
    train_iters: Optional[int] = None
    """The run's --train-iters, when the log says it."""

    @property
    def last_iteration(self) -> Optional[int]:
        return self.iterations[-1] if self.iterations else None


def parse_log_text(text: str) -> RunHistory:
    """Training and validation lines of a `spannorm-train` log (other lines are ignored), read
    by the log format's own parser (`training.log_format`)."""
    history = RunHistory()
    train, valid = parse_lines(text)
    for line in valid:
        history.valid_iterations.append(line.iteration)
        history.valid_loss.append(line.lm_loss)
    for line in train:
        history.iterations.append(line.iteration)
        history.train_iters = line.train_iters
        history.train_loss.append(line.lm_loss)
        history.grad_norm.append(line.grad_norm)
        history.learning_rate.append(line.learning_rate)
        history.step_ms.append(line.step_ms)
    return history


def parse_log(path: str) -> RunHistory:
    with open(path, errors="replace") as f:
        return parse_log_text(f.read())


def read_tensorboard(log_dir: str) -> RunHistory:
    """The same history from TensorBoard event files (tags `lm loss`, `grad-norm`,
    `learning-rate`, `lm loss validation`); `train_iters` stays unknown."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(log_dir):
        raise FileNotFoundError(f"no TensorBoard directory {log_dir}")
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))

    def series(tag) -> Dict[int, float]:
        if tag not in tags:
            return {}
        return {int(e.step): float(e.value) for e in accumulator.Scalars(tag)}

    loss, grad, lr = series("lm loss"), series("grad-norm"), series("learning-rate")
    valid = series("lm loss validation")
    history = RunHistory()
    for step in sorted(loss):
        history.iterations.append(step)
        history.train_loss.append(loss[step])
        history.grad_norm.append(grad.get(step))
        history.learning_rate.append(lr.get(step))
        history.step_ms.append(None)
    for step in sorted(valid):
        history.valid_iterations.append(step)
        history.valid_loss.append(valid[step])
    return history


def read_layer_grad_ratio(log_dir: str, depth: int, early: int = 2):
    """(iterations, ratios) of the per-layer parameter-gradient norms a run logged to
    TensorBoard (`stability/layer_NNN/grad_norm`, written on logging steps by spannorm-train):
    ratio = grad norm of layer `early`'s parameters / grad norm of layer `depth`'s. Empty when
    the tags are missing. The training-time counterpart of the signal-propagation probe's
    gradient ratio."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(log_dir) or depth < 1:
        return [], []
    early = min(early, depth)
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags().get("scalars", []))
    top, bottom = (f"stability/layer_{early:03d}/grad_norm",
                   f"stability/layer_{depth:03d}/grad_norm")
    if top not in tags or bottom not in tags:
        return [], []
    first = {int(e.step): float(e.value) for e in accumulator.Scalars(top)}
    last = {int(e.step): float(e.value) for e in accumulator.Scalars(bottom)}
    iterations = sorted(set(first) & set(last))
    ratios = [first[i] / last[i] if last[i] > 0 and math.isfinite(last[i]) else math.nan
              for i in iterations]
    return iterations, ratios


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def find_spikes(iterations: Sequence[int], losses: Sequence[Optional[float]]) -> List[int]:
    """Iterations whose loss is a spike (see the module docstring); missing values are skipped."""
    return loss_spikes(iterations, losses)


@dataclass
class RunVerdict:
    """One run, summarized."""

    start_loss: Optional[float]
    final_train_loss: Optional[float]
    min_train_loss: Optional[float]
    final_valid_loss: Optional[float]
    diverged: bool
    diverged_reason: str
    first_spike_iteration: Optional[int]
    num_spikes: int
    max_grad_norm: Optional[float]
    final_grad_norm: Optional[float]
    first_nonfinite_iteration: Optional[int]
    last_iteration: Optional[int]
    completed: bool
    median_step_ms: Optional[float]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def judge(history: RunHistory, exit_code: Optional[int] = None,
          train_iters: Optional[int] = None) -> RunVerdict:
    """The verdict on one run (definitions in the module docstring)."""
    losses = history.train_loss
    logged = [v for v in losses if v is not None]
    finite_losses = [v for v in logged if math.isfinite(v)]
    start = logged[0] if logged else None
    final = logged[-1] if logged else None
    valid = [v for v in history.valid_loss if v is not None]
    grads = [g for g in history.grad_norm if g is not None]

    first_nonfinite = None
    for iteration, loss, grad in zip(history.iterations, losses, history.grad_norm):
        if (loss is not None and not math.isfinite(loss)) or (
                grad is not None and not math.isfinite(grad)):
            first_nonfinite = iteration
            break
    reasons = []
    if first_nonfinite is not None:
        reasons.append(f"non-finite loss or grad norm at iteration {first_nonfinite}")
    if any(not math.isfinite(v) for v in valid):
        reasons.append("non-finite validation loss")
    if _finite(start) and _finite(final) and final > start:
        reasons.append(f"final loss {final:.3f} above the start {start:.3f}")
    spikes = find_spikes(history.iterations, losses)
    expected = train_iters or history.train_iters
    completed = (exit_code in (None, 0) and history.last_iteration is not None
                 and (expected is None or history.last_iteration >= expected))
    steps = [v for v in history.step_ms if _finite(v)]
    finite_grads = [g for g in grads if math.isfinite(g)]
    return RunVerdict(
        start_loss=start,
        final_train_loss=final,
        min_train_loss=min(finite_losses) if finite_losses else None,
        final_valid_loss=valid[-1] if valid else None,
        diverged=bool(reasons),
        diverged_reason="; ".join(reasons),
        first_spike_iteration=spikes[0] if spikes else None,
        num_spikes=len(spikes),
        max_grad_norm=max(finite_grads) if finite_grads else None,
        final_grad_norm=grads[-1] if grads else None,
        first_nonfinite_iteration=first_nonfinite,
        last_iteration=history.last_iteration,
        completed=completed,
        median_step_ms=median(steps) if steps else None,
    )
