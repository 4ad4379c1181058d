"""Which checkpoint to load: the pointer file, and finding a complete iteration directory.

Megatron-LM resumes from the iteration in ``latest_checkpointed_iteration.txt``. A save
replaces that file only after the directory it names is complete and in place, so the pointer
never names a partial checkpoint unless something outside this package broke it; then loading
stops with an error instead of guessing. Without a pointer (a save killed before writing its
first pointer, or a directory copied without it) the newest complete ``iter_*`` directory is
used. Everything here only reads the disk.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from spannorm_megatron.config import paths
from spannorm_megatron.errors import ConfigError

from . import manifest
from .errors import CheckpointError
from .naming import (
    OLD_INFIX,
    TRACKER_FILENAME,
    iteration_dir,
    iteration_dirname,
    iteration_dirs,
    parse_iteration_dirname,
    side_dirs,
)


def read_tracker(save_dir: str) -> Optional[int]:
    """The iteration in the pointer file, None when there is no pointer file.

    Raises CheckpointError when the file exists but holds no iteration number (the check of a
    checkpoint path's kind, `config.paths`, which the flags' parser ran already).
    """
    try:
        return paths.read_tracker(save_dir)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def complete_iterations(save_dir: str) -> List[int]:
    """Iterations with a complete directory (or a complete ``.old-`` copy awaiting restore)."""
    found = {it for it, path in iteration_dirs(save_dir) if manifest.is_complete(path)}
    found |= {it for it, infix, _nonce, path in side_dirs(save_dir)
              if infix == OLD_INFIX and manifest.is_complete(path)}
    return sorted(found)


def checkpoint_path(save_dir: str, iteration: int) -> Optional[str]:
    """The complete directory holding `iteration`, None when there is none.

    ``iter_NNNNNNN`` itself when complete; else a complete ``iter_NNNNNNN.old-*`` copy, which
    exists only when a re-save of that iteration was interrupted between moving the old copy
    aside and renaming the new one into place.
    """
    final = iteration_dir(save_dir, iteration)
    if manifest.is_complete(final):
        return final
    for it, infix, _nonce, path in reversed(side_dirs(save_dir)):
        if it == iteration and infix == OLD_INFIX and manifest.is_complete(path):
            return path
    return None


def _describe(save_dir: str) -> str:
    complete = complete_iterations(save_dir)
    incomplete = [os.path.basename(p) for it, p in iteration_dirs(save_dir)
                  if it not in complete]
    text = (f"complete checkpoints there: {[iteration_dirname(i) for i in complete]}"
            if complete else "there is no complete checkpoint there")
    if incomplete:
        text += (f"; incomplete (no {manifest.MANIFEST_FILENAME}, an interrupted save): "
                 f"{incomplete}")
    return text


def _training_directory_above(path: str) -> Optional[str]:
    """The checkpoint directory `path` is an ``iter_NNNNNNN`` of, if it is one."""
    parent, name = os.path.split(os.path.normpath(path))
    if parse_iteration_dirname(name) is None or parse_iteration_dirname(
            os.path.basename(parent)) is not None:
        return None
    if os.path.isfile(os.path.join(parent, TRACKER_FILENAME)) or complete_iterations(parent):
        return parent
    return None


def resolve(load_dir: str, iteration: Optional[int] = None) -> Tuple[int, str]:
    """(iteration, directory) to load from `load_dir`, or a CheckpointError saying why not.

    `iteration` picks one explicitly (Megatron-LM's ``--ckpt-step``); otherwise the pointer
    file's, or without one the newest complete directory.
    """
    inside = _training_directory_above(load_dir)
    if inside:
        raise CheckpointError(
            f"The load directory {load_dir} is an iteration inside the checkpoint directory "
            f"{inside}: pass that directory (--load {inside}); to load this iteration rather "
            f"than the newest, write its number into {os.path.join(inside, TRACKER_FILENAME)}."
        )
    if not os.path.isdir(load_dir):
        raise CheckpointError(
            f"The load directory {load_dir} does not exist. Check the path (it is the --save "
            f"directory of the earlier run, the one holding {TRACKER_FILENAME}), or do not pass "
            f"a load directory to start from scratch."
        )
    pointer = os.path.join(load_dir, TRACKER_FILENAME)
    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            complete = complete_iterations(load_dir)
            if not complete:
                raise CheckpointError(
                    f"The load directory {load_dir} holds no checkpoint: no {TRACKER_FILENAME} "
                    f"and no complete iter_NNNNNNN directory ({_describe(load_dir)}). Point the "
                    f"load directory at the --save directory of an earlier run, or start from "
                    f"scratch without one."
                )
            iteration = complete[-1]
        source = f"{pointer} names iteration {iteration}"
    else:
        source = f"iteration {iteration} was asked for"
    path = checkpoint_path(load_dir, iteration)
    if path is None:
        wanted = iteration_dir(load_dir, iteration)
        state = ("is incomplete (no " + manifest.MANIFEST_FILENAME + ": the save that wrote it "
                 "did not finish)") if os.path.isdir(wanted) else "does not exist"
        raise CheckpointError(
            f"{source}, but {wanted} {state}; {_describe(load_dir)}. Load one of the complete "
            f"iterations (write it into {pointer}, or pass it as the iteration to load)."
        )
    return iteration, path


def find_latest(load_dir: str) -> Optional[int]:
    """The iteration `load_checkpoint` would resume from, None when `load_dir` holds none.

    None when the directory is missing or holds neither a pointer file nor a complete
    ``iter_*`` directory (a fresh run). Raises CheckpointError when the pointer file is
    unreadable or names an iteration without a complete directory.
    """
    if not os.path.isdir(load_dir):
        return None
    if read_tracker(load_dir) is None and not complete_iterations(load_dir):
        return None
    return resolve(load_dir)[0]


def last_good_checkpoint(save_dir: str) -> str:
    """A sentence for a run that stops without saving: the checkpoint a resume from `save_dir`
    would load, or that there is none."""
    try:
        iteration = find_latest(save_dir)
    except CheckpointError as error:
        return f"{save_dir} holds no loadable checkpoint: {error}"
    if iteration is None:
        return f"{save_dir} holds no checkpoint yet: there is none to resume from"
    return (f"the last good checkpoint is iteration {iteration} "
            f"({checkpoint_path(save_dir, iteration)}), the one a resume from {save_dir} loads")
