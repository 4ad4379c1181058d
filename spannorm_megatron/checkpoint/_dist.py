"""The few collectives checkpointing needs, working with or without torch.distributed.

Saving and loading are collective: every rank must take the same branch, or one rank raises
while the others wait in a barrier until the timeout. The helpers here let rank 0 decide
(e.g. read the pointer file) and share the decision, and let all ranks pool what each one found
(e.g. per-file checks), so every rank raises the same `CheckpointError` or none does. Without an
initialized process group (a plain script) they degrade to a world of one.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, List

import torch


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def barrier() -> None:
    if _active() and world_size() > 1:
        torch.distributed.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not _active() or world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _active() or world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and return its result on every rank; an exception it raises is
    re-raised on every rank (same type and message), so no rank is left waiting."""
    outcome, error = None, None
    if rank() == 0:
        try:
            outcome = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - shipped to the other ranks, then re-raised
            error = err
            outcome = ("error", err if _picklable(err) else RuntimeError(f"rank 0: {err!r}"))
    outcome = broadcast(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def _picklable(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:  # noqa: BLE001
        return False
    return True
