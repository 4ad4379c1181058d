"""One run per --save directory.

Two runs writing into one directory would interleave their iterations, and the pointer would
follow whichever saved last. A run therefore holds an exclusive `fcntl` lock on
``SAVE_DIR/.spannorm.lock`` for as long as it may write there. The kernel releases the lock when
the holder dies, however it dies, so no stale lock can outlive a crash: the file stays, and
says who held it last. A second run is refused, naming the PID and host that hold it.

On a filesystem without `fcntl` locks (some network filesystems refuse them) the run goes on and
says once that --save is not protected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from .errors import CheckpointError

LOCK_FILENAME = ".spannorm.lock"


class SaveDirectoryLock:
    """`acquire()` or refuse; `release()` (also on `close`) lets the next run in."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, LOCK_FILENAME)
        self._fd: Optional[int] = None
        self.unprotected: Optional[str] = None
        """Why the lock could not be taken on this filesystem (None when it is held)."""

    def acquire(self) -> "SaveDirectoryLock":
        os.makedirs(self.save_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise CheckpointError(
                f"--save {self.save_dir} is in use by another run ({holder}): two runs writing "
                f"into one directory would overwrite each other's checkpoints. Wait for it to "
                f"end, stop it, or choose another --save directory.") from None
        except OSError as error:  # no lock support here: say so, do not stop the run
            os.close(fd)
            self.unprotected = f"{self.path}: file locks are not supported here ({error})"
            return self
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "SaveDirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"PID {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"
