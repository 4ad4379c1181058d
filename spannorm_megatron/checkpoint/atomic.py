"""Filesystem steps that leave either the old state or the new one, never a half-written one.

Crash safety of a save rests on three POSIX guarantees: ``os.replace`` of a file is atomic,
``os.rename`` of a directory to an unused name is atomic, and data reaches the disk only once
``fsync`` returned for the file *and* for the directory holding its name. So a save writes
everything under a temporary name, fsyncs it, and only then renames it into place; the pointer
file is replaced the same way. A directory cannot be atomically renamed over a non-empty one,
so re-saving an iteration first moves the old copy aside (``.old-``) and the loader falls back
to that copy if a crash hits between the two renames (`resolve` in `tracker.py`).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from .naming import MANIFEST_FILENAME, OLD_INFIX, TMP_INFIX


def fsync_path(path: str) -> None:
    """Flush a file's data, or a directory's entries, to stable storage (best effort where the
    platform cannot fsync directories)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str, nonce: str) -> None:
    """Replace `path` with `text` so that readers see the old content or the new, never a mix."""
    tmp = f"{path}{TMP_INFIX}{nonce}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def publish_dir(tmp: str, final: str, nonce: str) -> Optional[str]:
    """Rename the finished `tmp` directory to `final`.

    When `final` exists (the same iteration saved again) it is first renamed to
    ``final.old-<nonce>``, whose path is returned so the caller deletes it once the pointer file
    is updated; until then it is the fallback copy. Returns None when there was nothing to move.
    """
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.exists(final):
        old = f"{final}{OLD_INFIX}{nonce}"
        os.rename(final, old)
        fsync_path(parent)
    os.rename(tmp, final)
    fsync_path(parent)
    return old


def remove_tree(path: str) -> None:
    """Delete a directory tree; a crash half-way leaves debris that the next save removes."""
    shutil.rmtree(path, ignore_errors=True)


def retire_dir(path: str) -> None:
    """Delete a checkpoint directory, its manifest first: from the first step on it no longer
    counts as complete, however far the deletion gets before a crash."""
    try:
        os.remove(os.path.join(path, MANIFEST_FILENAME))
        fsync_path(path)
    except FileNotFoundError:
        pass
    remove_tree(path)
