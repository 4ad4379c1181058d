"""Host snapshots: rollback points kept in memory between checkpoints
(`--rollback-snapshot-interval`; training.rollback decides when one is used).

Every N iterations each rank copies its own training state into host memory: its model chunks'
``state_dict()``, each megatron-core optimizer's own state (for the distributed optimizer its
``state_dict()`` and its rank-local ``get_parameter_state_dp_reshardable()``: the fp32 main
parameters and Adam's moments of this rank's shard), the scheduler's ``state_dict()``, the RNG
states, the position (iteration, consumed samples) and the rollback course then. Restoring hands
the same objects back to the same methods (``load_state_dict``, megatron-core's
``dp_reshardable`` load).

A rank-local copy is enough because a snapshot is only ever restored into the run that took it:
the parallel layout, the parameter buckets and this rank's shard of them are the same, so no
resharding (what the distributed checkpoint format is for) is needed and no rank talks to
another.

Devices: every copy of the model's and the optimizer's tensors goes to the host explicitly and
comes back with ``.to(current_device())``, except what lived on the host already (torch's Adam
``step`` counters), which stays there, as torch's Adam expects. The generator states are cloned
where they are, which is where the generators take them back. Each restore makes new tensors,
so one snapshot can be restored more than once.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, List, Optional

import torch

from spannorm_megatron.runtime import current_device

from . import rng, state

KEEP = 2
"""Snapshots kept (the newest): host memory for KEEP copies of the rank's weights and optimizer
state; a rollback needs the newest before the event began, which is one of the last two unless
the event began more than two intervals back (then a checkpoint is the point anyway)."""


@dataclass
class _HostTensor:
    """A host copy of a tensor, and whether it came from the device (it goes back there)."""

    tensor: torch.Tensor
    on_device: bool


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _HostTensor(value.detach().to("cpu", copy=True), value.device.type != "cpu")
    return _map(value, _to_host)


def _back(value: Any) -> Any:
    """A fresh copy of a host tree, its tensors where they came from."""
    if isinstance(value, _HostTensor):
        return value.tensor.to(current_device() if value.on_device else "cpu", copy=True)
    return _map(value, _back)


def _clone(value: Any) -> Any:
    """A copy of the generator states, each tensor where it is (they are not moved: the
    generators take their states as they gave them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return _map(value, _clone)


def _map(value: Any, fn) -> Any:
    """`fn` over a container's items (a module state dict keeps its ``_metadata``: the
    versions its modules' loaders read); other values are copied."""
    if isinstance(value, dict):
        mapped = type(value)((key, fn(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            mapped._metadata = copy.deepcopy(value._metadata)
        return mapped
    if isinstance(value, (list, tuple)):
        return type(value)(fn(item) for item in value)
    return copy.deepcopy(value)


def _is_distributed(inner) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(inner, DistributedOptimizer)


def _optimizer_state(optimizer) -> List[dict]:
    """Each megatron-core optimizer's state, as its own methods give it (references)."""
    state.ensure_optimizer_state(optimizer)  # a first step skipped: the state Adam starts from
    parts = []
    for inner in state.inner_optimizers(optimizer):
        part = {"state_dict": inner.state_dict()}
        if _is_distributed(inner):
            part["param_state"] = inner.get_parameter_state_dp_reshardable()
        parts.append(part)
    return parts


@torch.no_grad()  # megatron-core copies into the main parameters, views of trained weights
def _load_optimizer_state(optimizer, parts: List[dict]) -> None:
    for inner, part in zip(state.inner_optimizers(optimizer), parts, strict=True):
        state_dict = _back(part["state_dict"])
        if "param_state" in part:
            param_state = _back(part["param_state"])
            # The getter's buckets hold parameters only; the loader takes them in the layout
            # megatron-core's own dp_reshardable checkpoints give it, each entry marked as a
            # parameter (not padding).
            for key, by_dtype in param_state.items():
                if isinstance(key, int):
                    for buckets in by_dtype.values():
                        for bucket in buckets:
                            for entry in bucket:
                                entry["padding"] = False
            state_dict.update(param_state=param_state,
                              param_state_sharding_type="dp_reshardable")
        inner.load_state_dict(state_dict)


@dataclass
class Snapshot:
    """One rank's training state at `iteration`, in host memory."""

    iteration: int
    consumed_train_samples: int
    consumed_valid_samples: int
    scheduler_steps: int
    course: List[dict]
    """The rollback course the run followed then (the checkpoint's ``args.rollbacks``)."""
    _state: dict = field(repr=False)

    @classmethod
    def take(cls, model_chunks, optimizer, scheduler, *, iteration: int,
             consumed_train_samples: int, consumed_valid_samples: int,
             course: List[dict]) -> "Snapshot":
        from spannorm_megatron.runtime.distributed import gather_updated_parameters

        gather_updated_parameters(model_chunks)  # as before a checkpoint
        captured = {
            "model": [chunk.state_dict() for chunk in model_chunks],
            "optimizer": _optimizer_state(optimizer),
            "scheduler": scheduler.state_dict(),
        }
        return cls(iteration, int(consumed_train_samples), int(consumed_valid_samples),
                   int(scheduler.num_steps), copy.deepcopy(course),
                   dict(_to_host(captured), rng=_clone(rng.local_state())))

    def restore(self, model_chunks, optimizer, scheduler) -> None:
        """Model, optimizer, scheduler and RNG as they were (the scheduler's step count is set,
        not added to, unlike megatron-core's `load_state_dict` on its own)."""
        for chunk, saved in zip(model_chunks, self._state["model"], strict=True):
            chunk.load_state_dict(_back(saved), strict=True)
        _load_optimizer_state(optimizer, self._state["optimizer"])
        scheduler.num_steps = 0  # its load_state_dict steps by the saved count
        scheduler.load_state_dict(_back(self._state["scheduler"]))
        rng.restore([_clone(self._state["rng"])], rng.PP_TP_DP)

    @property
    def position(self) -> dict:
        """What `checkpoint.load.read_position` says of a checkpoint."""
        return {"consumed_train_samples": self.consumed_train_samples,
                "scheduler_steps": self.scheduler_steps}


class Snapshots:
    """The newest KEEP snapshots of this rank, oldest first."""

    def __init__(self, keep: int = KEEP):
        self._kept: Deque[Snapshot] = deque(maxlen=keep)

    def add(self, snapshot: Snapshot) -> None:
        self.drop_after(snapshot.iteration - 1)
        self._kept.append(snapshot)

    def iterations(self) -> List[int]:
        return [snapshot.iteration for snapshot in self._kept]

    def at(self, iteration: int) -> Optional[Snapshot]:
        return next((s for s in self._kept if s.iteration == iteration), None)

    def drop_after(self, iteration: int) -> None:
        """Forget the snapshots after `iteration` (a course a rollback abandoned)."""
        while self._kept and self._kept[-1].iteration > iteration:
            self._kept.pop()


__all__ = ["KEEP", "Snapshot", "Snapshots"]
