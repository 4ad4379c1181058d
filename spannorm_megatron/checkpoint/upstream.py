"""Work-around for a megatron-core bug on the checkpoint load path, scoped to one load call.

TARGET: megatron-core 0.16.1 (DistributedOptimizer without Apex / Transformer Engine, i.e. over
``torch.optim.Adam(W)``, the CPU path).

WHY, two bugs of ``DistributedOptimizer.load_state_dict`` on that path:

1. It first restores each parameter's ``step`` into the torch optimizer state, then
   ``load_parameter_state_from_fully_reshardable`` hands ``_set_main_param_and_optimizer_states``
   the loaded tensors *without* ``step`` (skipped on purpose), and that method copies every key
   of the *destination* state, ``step`` included: ``KeyError: 'step'``. So no fully reshardable
   optimizer state can be loaded.
2. The restored ``step`` is one tensor object shared by every parameter's state. torch's Adam
   increments each parameter's ``step`` in place, so after a load every optimizer step adds
   the number of parameters instead of 1: bias correction goes wrong and training after a
   resume drifts from uninterrupted training (loss differences ~1e-4 after two steps), and the
   step saved next differs between ranks. (``sharded_state_dict(is_loading=True)``, which
   calls ``load_state_dict(state_dict())``, does the same.)

FIX: while `fixed_optimizer_load` is active, the optimizer instance's method is given its own
current ``step`` for the missing key (a copy onto itself); when it ends, every parameter gets
its own ``step`` tensor again. Only the instances being loaded are touched; nothing global is
patched.

OBSOLETE_WHEN: `needed` returns False (the probe finds ``_set_main_param_and_optimizer_states``
tolerating a missing ``step``, or Apex/TE in use) and a resume of a distributed-optimizer run
matches uninterrupted training (tests/test_checkpoint.py); then this module can go. It belongs
with the other upstream fixes in ``patches/`` once that package takes instance-scoped fixes.
"""

from __future__ import annotations

import contextlib
import inspect

import torch


def _distributed_optimizers(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _affected() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _copies_every_destination_key() -> bool:
    """Probe for bug 1 in the installed source (not the version)."""
    from megatron.core.optimizer import distrib_optimizer

    source = inspect.getsource(
        distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states)
    return "dst_tensors[key].copy_(tensors[key])" in source


def needed() -> bool:
    """Whether the installed megatron-core runs the affected path with bug 1 present."""
    return _affected() and _copies_every_destination_key()


@contextlib.contextmanager
def fixed_optimizer_load(optimizer):
    """Make ``optimizer.load_state_dict`` (and ``sharded_state_dict(is_loading=True)``) work on
    the affected path (see the module docstring). ``optimizer`` may be None (nothing to do)."""
    targets = _distributed_optimizers(optimizer) if optimizer is not None and _affected() else []
    patched = targets if _copies_every_destination_key() else []
    for inner in patched:
        original = inner._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _inner=inner, _original=original):
            group_index, group_order = _inner.model_param_group_index_map[model_param]
            main_param = _inner.optimizer.param_groups[group_index]["params"][group_order]
            step = _inner.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return _original(model_param, tensors)

        inner._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class method
        for inner in targets:
            _unshare_steps(inner.optimizer)


def _unshare_steps(torch_optimizer) -> None:
    """Give every parameter its own ``step`` tensor (bug 2)."""
    seen = set()
    for param_state in torch_optimizer.state.values():
        step = param_state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                param_state["step"] = step.clone()
            seen.add(id(step))
