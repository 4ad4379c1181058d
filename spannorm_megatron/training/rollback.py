"""Rollbacks: when the collapse alarm or a loss spike fires, go back to the newest checkpoint saved
before the event began, and go on from there on a changed course (`--on-collapse rollback`,
`--on-loss-spike rollback`; flags in config/rollback.py).

What a rollback decides (`RollbackPolicy.plan`, the same on every rank: the alarm reads signals
every rank already holds, and the Trainer agrees on a spike with one all-reduce):
- **The rollback point**: the newest complete checkpoint saved before the event began, or,
  with --rollback-snapshot-interval, the newest host snapshot (checkpoint.snapshot) before it
  when that is newer. A collapse begins at the first logged step of the layer-2/L ratio's fall
  that crossed the threshold (`CollapseReport.fall_began`); a spike at its own iteration. A run
  with a rollback policy saves iteration 0 before its first step, so there always is one.
- **The changed course**: the learning rate of the rest of the run times --rollback-lr-factor
  (compounded over rollbacks), ramped again from 0 over --rollback-extra-warmup-iters
  (`lr_multiplier`, applied by `schedule.CourseScheduler`); and the data position moved past
  --rollback-skip-batches global batches after the point (auto: every batch up to the event).
  The iteration count goes back to the point: the run still ends at --train-iters, and the
  iterations between the point and the event are the extra ones it spent.

Each rollback is an entry of the journal beside the checkpoints (checkpoint.rollbacks), written
before anything changes, so a crash half-way is finished at the next start, and every later
start (with the policy or without) follows the same course and says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from spannorm_megatron.config.job import JobConfig
from spannorm_megatron.config.rollback import AUTO, RollbackConfig
from spannorm_megatron.errors import ConfigError, RunFailure


class RollbackLimitError(RunFailure):
    """An event past --max-rollbacks: the run stops (exit code 1), keeping every checkpoint."""


@dataclass
class Event:
    """Something a rollback policy answers."""

    cause: str
    """'collapse' or 'loss spike'."""
    iteration: int
    """Where it was seen."""
    began: int
    """The first iteration it affected: the rollback point comes before it."""
    detail: str
    """What the log said about it."""


def extra_train_samples(config: RollbackConfig, train_iters: int, global_batch_size: int) -> int:
    """Training samples the data needs beyond the run's own, for the batches --max-rollbacks
    rollbacks may skip (auto skips at most the whole run each time)."""
    if not config.enabled:
        return 0
    per_rollback = train_iters if config.rollback_skip_batches == AUTO \
        else config.rollback_skip_batches
    return config.max_rollbacks * per_rollback * global_batch_size


def check_rollback_flags(job: JobConfig, train_iters: int, start_iteration: int) -> None:
    """Refuse, before any process group exists, a rollback policy that cannot work."""
    config, checkpoint = job.rollback, job.checkpoint
    if not config.enabled:
        return
    policy = config.policy_flags()
    if not checkpoint.save:
        raise ConfigError(
            f"{policy} needs --save: a rollback goes back to a checkpoint of this run. Give "
            f"--save DIR (with --save-interval N, the rollback point is at most N iterations "
            f"before the event), or drop the rollback policy.")
    if checkpoint.load and os.path.abspath(checkpoint.load) != os.path.abspath(checkpoint.save):
        raise ConfigError(
            f"{policy} with --load {checkpoint.load} and --save {checkpoint.save}: a rollback "
            f"goes back within the directory the run resumes from. Pass the same directory to "
            f"both (copy the checkpoint there first to branch off another run).")
    if config.on_collapse == "rollback" and job.logging.collapse_grad_ratio == 0:
        raise ConfigError(
            "--on-collapse rollback with --collapse-grad-ratio 0: the collapse alarm is off, so "
            "nothing would roll back. Give a threshold (1e-3 is the default), or --on-collapse "
            "warn.")
    skip = config.rollback_skip_batches
    left = train_iters - start_iteration
    if skip != AUTO and skip > left:
        raise ConfigError(
            f"--rollback-skip-batches {skip} is more than what is left of the run: {left} "
            f"iterations of --train-iters {train_iters} from iteration {start_iteration}. Skip "
            f"at most {left}, or auto (the batches between the rollback point and the event).")


class RollbackPolicy:
    """What the run does at an event, and the course its rollbacks set (see the module doc).

    `course` is the journal's list of rollbacks (oldest first) this run follows."""

    def __init__(self, config: RollbackConfig, course: Optional[List[dict]] = None):
        self.config = config
        self.course = list(course or [])

    # ------------------------------------------------------------------ the course
    @property
    def lr_scale(self) -> float:
        """The product of every rollback's learning-rate factor so far."""
        return float(self.course[-1]["lr_scale"]) if self.course else 1.0

    def lr_multiplier(self, num_steps: int) -> float:
        """The course's factor on the schedule's learning rate at scheduler step `num_steps`
        (samples): the compounded factor, times the renewed warm-up's ramp since the last
        rollback point (0 at the point, 1 after --rollback-extra-warmup-iters)."""
        if not self.course:
            return 1.0
        last = self.course[-1]
        ramp = 1.0
        if last["warmup_samples"] > 0:
            ramp = (num_steps - last["warmup_from_samples"]) / last["warmup_samples"]
        return float(last["lr_scale"]) * min(1.0, max(0.0, ramp))

    def describe(self) -> str:
        """The course in one line, for the start of a resumed run."""
        last = self.course[-1]
        causes = ", ".join(f"{entry['cause']} at iteration {entry['event_iteration']} -> "
                           f"{entry['point']}" for entry in self.course)
        return (f"this run follows the course its {len(self.course)} rollback(s) set ({causes}): "
                f"learning rate x{self.lr_scale:g} of its schedule, warmed up again over "
                f"{last['extra_warmup_iters']} iterations from iteration {last['point']}, "
                f"{self.skipped_batches()} batches skipped in all (rollbacks.json beside the "
                f"checkpoints)")

    def data_position(self, iteration: int, consumed_train_samples: int) -> int:
        """Where the data goes on from a checkpoint loaded at `iteration`: past the last
        rollback's skipped batches when that checkpoint is its point, not yet moved on (a
        rollback a crash cut short), else where the checkpoint says."""
        last = self.course[-1] if self.course else None
        if last and iteration == last["point"] and \
                consumed_train_samples == last["skipped_samples"][0]:
            return int(last["skipped_samples"][1])
        return consumed_train_samples

    def skipped_batches(self) -> int:
        return sum(int(entry["skip_batches"]) for entry in self.course)

    # ------------------------------------------------------------------ events
    def on_collapse(self, report) -> Optional[Event]:
        """The event a collapse alarm's report is, under --on-collapse rollback."""
        if report is None or self.config.on_collapse != "rollback":
            return None
        return Event("collapse", report.iteration, report.fall_began, report.message())

    def on_spike(self, iteration: int) -> Optional[Event]:
        """The event a loss spike at `iteration` is, under --on-loss-spike rollback."""
        if self.config.on_loss_spike != "rollback":
            return None
        return Event("loss spike", iteration, iteration,
                     f"loss spike at iteration {iteration} (--loss-spike-factor)")

    def plan(self, event: Event, checkpoints: List[int], position_of: Callable[[int], dict],
             consumed_at_event: int, global_batch_size: int, run_warmup_samples: int,
             snapshots: Sequence[int] = ()) -> dict:
        """The journal entry of the rollback `event` calls for: `checkpoints` are the complete
        iterations on disk, `snapshots` those of the host snapshots, `position_of(iteration)`
        the point's `read_position` (or the snapshot's). A snapshot is the point only when it is
        newer than every checkpoint before the event (``source`` says which). Raises
        RollbackLimitError past --max-rollbacks or without a checkpoint before the event."""
        config = self.config
        if len(self.course) >= config.max_rollbacks:
            raise RollbackLimitError(
                f"{event.cause} at iteration {event.iteration} after {len(self.course)} "
                f"rollback(s), --max-rollbacks {config.max_rollbacks}: stopping. Every checkpoint "
                f"is kept (those of abandoned courses under rolled_back/; the course so far in "
                f"rollbacks.json). Resume with a gentler schedule (--lr, --lr-warmup-iters), or "
                f"raise --max-rollbacks. The event: {event.detail}")
        before = [iteration for iteration in checkpoints if iteration < event.began]
        if not before:
            raise RollbackLimitError(
                f"{event.cause} at iteration {event.iteration}: no checkpoint was saved before "
                f"iteration {event.began}, where it began, so there is nothing to roll back to. "
                f"Save more often (--save-interval).")
        point = max(before)
        newer = [iteration for iteration in snapshots if point < iteration < event.began]
        source = "checkpoint"
        if newer:
            point, source = max(newer), "snapshot"
        position = position_of(point)
        # Where this course's data stood at the point: past the last rollback's skip when it
        # went back to the same checkpoint.
        start = self.data_position(point, position["consumed_train_samples"])
        if config.rollback_skip_batches == AUTO:
            skip_batches = event.iteration - point
            skipped = consumed_at_event - start
        else:
            skip_batches = config.rollback_skip_batches
            skipped = skip_batches * global_batch_size
        warmup_samples = (run_warmup_samples if config.rollback_extra_warmup_iters is None
                          else config.rollback_extra_warmup_iters * global_batch_size)
        return {
            "number": len(self.course) + 1,
            "cause": event.cause,
            "event_iteration": event.iteration,
            "began": event.began,
            "point": point,
            "source": source,
            "lr_factor": config.rollback_lr_factor,
            "lr_scale": self.lr_scale * config.rollback_lr_factor,
            "extra_warmup_iters": int(round(warmup_samples / global_batch_size)),
            "warmup_samples": int(warmup_samples),
            "warmup_from_samples": int(position["scheduler_steps"] or 0),
            "skip_batches": int(skip_batches),
            "skipped_samples": [int(start), int(start + skipped)],
            "detail": event.detail,
        }

    def follow(self, entry: dict) -> None:
        """Take `entry` (a rollback just made) into the course."""
        self.course.append(dict(entry, status="done"))

    @staticmethod
    def message(entry: dict) -> str:
        """What the log says about a rollback."""
        first, end = entry["skipped_samples"]
        skipped = (f"{_count(entry['skip_batches'], 'batch', 'batches')} skipped (samples "
                   f"{first}-{end - 1})" if end > first else "no batch skipped")
        return (f"rollback {entry['number']}: {entry['cause']} at iteration "
                f"{entry['event_iteration']} (began at {entry['began']}); back to the "
                f"{_source(entry)} of iteration {entry['point']}. From there: learning rate x{entry['lr_scale']:g} "
                f"of the schedule (this rollback x{entry['lr_factor']:g}), warmed up again over "
                f"{_count(entry['extra_warmup_iters'], 'iteration', 'iterations')}; {skipped}; "
                f"{_count(entry['event_iteration'] - entry['point'], 'iteration', 'iterations')} "
                f"to train again.")

    @staticmethod
    def scalars(entry: dict) -> dict:
        """The TensorBoard scalars of a rollback (metrics.tensorboard.ROLLBACK_SCALARS)."""
        return {"count": entry["number"], "point": entry["point"], "lr_scale": entry["lr_scale"],
                "extra_warmup_iters": entry["extra_warmup_iters"],
                "skipped_batches": entry["skip_batches"],
                "from_snapshot": float(entry.get("source") == "snapshot")}


def _source(entry: dict) -> str:
    """What a rollback went back to (journals from before snapshots existed: a checkpoint)."""
    return "host snapshot" if entry.get("source") == "snapshot" else "checkpoint"


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


__all__ = ["Event", "RollbackLimitError", "RollbackPolicy", "check_rollback_flags",
           "extra_train_samples"]
