"""The rollback journal: the course a run took after rolling back, kept beside its checkpoints.

    SAVE_DIR/rollbacks.json            {"format": ..., "extra_train_samples": N,
                                        "rollbacks": [entry, ...]}
    SAVE_DIR/rolled_back/<n>/iter_*    the checkpoints rollback n left behind (kept, not loaded)

The journal is created when a run with a rollback policy first starts, with the training samples
its data was built with beyond the run's own (room for the batches rollbacks skip): every later
start of the run, with the policy or without, builds the same data, so the data order never
changes under a resume. A rollback (training.rollback) changes three things on disk, in this order, each step atomic:

1. the journal gains the rollback's entry, marked ``pending``;
2. the pointer file names the rollback point;
3. every complete checkpoint after the point moves to ``rolled_back/<n>/`` (out of the loader's
   sight: the old course must not be resumed), then the entry is marked ``done``.

A crash anywhere in between leaves a ``pending`` entry, and `finish_pending` (run at the next
start, before anything is loaded) does steps 2 and 3 again: they are idempotent. The entries are
what the rest of the run follows (learning-rate factor, renewed warm-up, skipped samples), so a
plain resume keeps the changed course. Rank 0 writes (`on_rank0`); the rest is file work only.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Optional

from . import _dist
from .atomic import atomic_write_text, fsync_path
from .errors import CheckpointError
from .naming import TRACKER_FILENAME, iteration_dirs
from .save import clean_debris

JOURNAL_FILENAME = "rollbacks.json"
ROLLED_BACK_DIRNAME = "rolled_back"
FORMAT = "spannorm_megatron.rollbacks/1"


def on_rank0(fn):
    """`fn()` on rank 0 only (the journal's writer), its result on every rank."""
    return _dist.on_rank0(fn)


def journal_path(save_dir: str) -> str:
    return os.path.join(save_dir, JOURNAL_FILENAME)


def read_journal(save_dir: str) -> Optional[dict]:
    """The journal of `save_dir` ({"extra_train_samples": N, "rollbacks": [entry, ...]}, oldest
    first), or None where there is none."""
    path = journal_path(save_dir)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable rollback journal ({error}). It records "
                              f"the course this run took after its rollbacks: restore it from "
                              f"a copy, or delete it to resume on the original course.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(
            data.get("rollbacks"), list) or not isinstance(data.get("extra_train_samples"), int):
        raise CheckpointError(f"{path} is not a rollback journal of format {FORMAT}: restore it, "
                              f"or delete it to resume on the original course.")
    return data


def _write(save_dir: str, journal: dict) -> None:
    text = json.dumps(dict(journal, format=FORMAT), indent=1, sort_keys=True) + "\n"
    atomic_write_text(journal_path(save_dir), text, uuid.uuid4().hex[:12])


def create_journal(save_dir: str, extra_train_samples: int) -> None:
    """An empty journal, where there is none yet."""
    if read_journal(save_dir) is None:
        os.makedirs(save_dir, exist_ok=True)
        _write(save_dir, {"extra_train_samples": int(extra_train_samples), "rollbacks": []})


def begin_rollback(save_dir: str, entry: dict) -> None:
    """Step 1: append `entry` (its ``number`` is the journal's length + 1), marked pending."""
    journal = read_journal(save_dir)
    if journal is None:
        raise CheckpointError(f"{journal_path(save_dir)} is gone: a rollback cannot be recorded.")
    entries = journal["rollbacks"]
    if entry["number"] != len(entries) + 1:
        raise CheckpointError(f"{journal_path(save_dir)} holds {len(entries)} rollbacks; "
                              f"rollback {entry['number']} cannot follow them.")
    _write(save_dir, dict(journal, rollbacks=entries + [dict(entry, status="pending")]))


def finish_pending(save_dir: str) -> Optional[dict]:
    """Steps 2 and 3 for a pending entry (a rollback that a crash interrupted, or the one just
    begun); returns the journal, every entry done (None where there is none)."""
    journal = read_journal(save_dir)
    entries = journal["rollbacks"] if journal else []
    if not entries or entries[-1].get("status") != "pending":
        return journal
    entry = entries[-1]
    point = int(entry["point"])
    clean_debris(save_dir)
    atomic_write_text(os.path.join(save_dir, TRACKER_FILENAME), f"{point}\n",
                      uuid.uuid4().hex[:12])
    later = [(iteration, path) for iteration, path in iteration_dirs(save_dir)
             if iteration > point]
    if later:
        kept = os.path.join(save_dir, ROLLED_BACK_DIRNAME, str(entry["number"]))
        os.makedirs(kept, exist_ok=True)
        for _, path in later:
            os.rename(path, os.path.join(kept, os.path.basename(path)))
        fsync_path(kept)
        fsync_path(save_dir)
    journal = dict(journal, rollbacks=entries[:-1] + [dict(entry, status="done")])
    _write(save_dir, journal)
    return journal


__all__ = ["JOURNAL_FILENAME", "ROLLED_BACK_DIRNAME", "begin_rollback", "create_journal",
           "finish_pending",
           "journal_path", "on_rank0", "read_journal"]
