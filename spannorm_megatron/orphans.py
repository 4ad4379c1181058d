"""No process outlives the one that started it.

A trainer or preprocessing run that is killed (SIGKILL, the OOM killer) cannot stop its
children: megatron-core's forked checkpoint writers, fork-started data and tokenizer workers.
Nor can a killed torchrun agent stop its ranks. Re-parented to init, they keep their memory and
keep training and writing into the run's files. On Linux the kernel can signal a process when
its parent dies (PR_SET_PDEATHSIG):

- `die_with_launcher()`: a rank started by torchrun asks for SIGKILL when its agent dies (the
  first thing `spannorm-train` does, before its imports);
- `die_with_parent()`: every child forked after it asks for SIGKILL when this process dies.

Elsewhere both do nothing. Standard library only, so that it can run before torch is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_state = {"registered": False, "parent": None}


def _before_fork() -> None:
    _state["parent"] = os.getpid()


def _die_with_parent_now() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _after_fork_in_child() -> None:
    _die_with_parent_now()
    if os.getppid() != _state["parent"]:  # the parent died before prctl took effect
        os._exit(1)


def die_with_launcher() -> bool:
    """Under torchrun (its agent is this process's parent), die with the agent; True where that
    is set up. A rank whose agent is already gone exits at once."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    _die_with_parent_now()
    if os.getppid() == 1:
        os._exit(1)  # the agent died before prctl took effect
    return True


def die_with_parent() -> bool:
    """Make every later fork of this process die with it; True where the OS supports it."""
    if not sys.platform.startswith("linux"):
        return False
    if not _state["registered"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _state["registered"] = True
    return True


def process_gone(pid: int) -> bool:
    """Whether no process `pid` runs on this host (one of another user still counts as running).
    What a killed run left behind is recognised by the PID in its name and this test."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
