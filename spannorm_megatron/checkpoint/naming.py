"""Names on disk, as Megatron-LM lays out a save directory.

    SAVE_DIR/
      latest_checkpointed_iteration.txt     the iteration to resume from ("100")
      iter_0000100/                         one complete checkpoint (7-digit iteration)
      iter_0000200.tmp-1a2b3c4d/            a save in progress (or interrupted): never loaded
      iter_0000100.old-5e6f7a8b/            old copy while a re-save of iteration 100 replaces it

Keeping Megatron-LM's names means its tools and habits (``--load``, ``--ckpt-step``, looking at the
pointer file) carry over. The ``.tmp-``/``.old-`` suffixes are ours (crash safety, see
`spannorm_megatron.checkpoint.atomic`); no Megatron tool lists them as checkpoints because
they do not match ``iter_\\d{7}``.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

from spannorm_megatron.config.paths import TRACKER_FILENAME  # noqa: F401 (the pointer's name,
# declared where a checkpoint path's kind is checked)

MANIFEST_FILENAME = "manifest.json"
"""Written last inside a checkpoint directory: without it the directory is incomplete."""

RUN_RECORD_FILENAME = "run.json"
"""Human-readable record of the run that saved the checkpoint (config, layout, versions, args)."""

TMP_INFIX = ".tmp-"
"""Suffix of a save in progress: ``iter_0000100.tmp-<nonce>``."""

OLD_INFIX = ".old-"
"""Suffix of the previous copy of an iteration while a re-save replaces it."""

_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_SIDE_RE = re.compile(r"^iter_(\d{7,})(\.tmp-|\.old-)([0-9A-Za-z]+)$")


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, iteration_dirname(iteration))


def parse_iteration_dirname(name: str) -> Optional[int]:
    """The iteration of a final checkpoint directory name, None for anything else."""
    match = _ITER_RE.match(name)
    return int(match.group(1)) if match else None


def parse_side_dirname(name: str) -> Optional[Tuple[int, str, str]]:
    """(iteration, infix, nonce) of a ``.tmp-``/``.old-`` directory name, None for anything else."""
    match = _SIDE_RE.match(name)
    return (int(match.group(1)), match.group(2), match.group(3)) if match else None


def _parsed_dirs(save_dir: str, parse) -> list:
    """(*parse(name), path) for every directory of `save_dir` whose name `parse` accepts."""
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        parsed = parse(name)
        path = os.path.join(save_dir, name)
        if parsed is not None and os.path.isdir(path):
            found.append((*(parsed if isinstance(parsed, tuple) else (parsed,)), path))
    return sorted(found)


def iteration_dirs(save_dir: str) -> List[Tuple[int, str]]:
    """(iteration, path) of every ``iter_NNNNNNN`` directory, complete or not, oldest first."""
    return _parsed_dirs(save_dir, parse_iteration_dirname)


def side_dirs(save_dir: str) -> List[Tuple[int, str, str, str]]:
    """(iteration, infix, nonce, path) of every ``.tmp-``/``.old-`` directory."""
    return _parsed_dirs(save_dir, parse_side_dirname)
