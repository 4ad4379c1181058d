"""Forked children die with the process that forked them.

A trainer or preprocessing run that is killed (SIGKILL, the OOM killer) cannot stop its
children: megatron-core's forked checkpoint writers, fork-started data and tokenizer workers.
Re-parented to init, they keep their memory and keep writing into the dead run's files. On
Linux the kernel can signal a child when its parent dies (PR_SET_PDEATHSIG); every child
forked after `die_with_parent()` asks for SIGKILL then. Elsewhere this does nothing.
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


def _after_fork_in_child() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _state["parent"]:  # the parent died before prctl took effect
        os._exit(1)


def die_with_parent() -> bool:
    """Make every later fork of this process die with it; True where the OS supports it."""
    if not sys.platform.startswith("linux"):
        return False
    if not _state["registered"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _state["registered"] = True
    return True
