"""DistributedOptimizer over torch's Adam(W): loading its state fails, or shares one ``step``.

Not a CPU issue: it hits any install without Apex or Transformer Engine, where megatron-core's
distributed optimizer wraps ``torch.optim.Adam(W)``; found through checkpoint resumes on CPU.
Two bugs of ``DistributedOptimizer.load_state_dict`` on that path:

1. It restores each parameter's ``step`` into the torch optimizer state, then
   ``load_parameter_state_from_fully_reshardable`` hands ``_set_main_param_and_optimizer_states``
   the loaded tensors *without* ``step`` (skipped on purpose), and that method copies every key
   of the *destination* state, ``step`` included: ``KeyError: 'step'``. So no fully reshardable
   optimizer state can be loaded. The replacement gives it the parameter's current ``step`` for
   the missing key (a copy onto itself).
2. The restored ``step`` is one tensor object shared by every parameter's state. torch's Adam
   increments each parameter's ``step`` in place, so after a load every optimizer step adds the
   number of parameters instead of 1: bias correction goes wrong, training after a resume
   drifts from uninterrupted training (loss differences ~1e-4 after two steps), and the step
   saved next differs between ranks. (``sharded_state_dict(is_loading=True)``, which calls
   ``load_state_dict(state_dict())``, does the same.) The wrapped ``load_state_dict`` gives
   every parameter its own ``step`` tensor again.
"""

from __future__ import annotations

import inspect

import torch

from .contract import Patch


def _distrib_optimizer():
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer


def _probe(original) -> bool:
    """The torch-Adam path is taken and either bug is in the installed source."""
    module = _distrib_optimizer()
    if module.HAVE_APEX_OR_TE:
        return False
    cls = module.DistributedOptimizer
    copies_every_key = "dst_tensors[key].copy_(tensors[key])" in inspect.getsource(
        original(cls, "_set_main_param_and_optimizer_states"))
    shares_step = 's["step"] = step\n' in inspect.getsource(original(cls, "load_state_dict"))
    return copies_every_key or shares_step


def _unshare_steps(torch_optimizer) -> None:
    """Give every parameter its own ``step`` tensor (bug 2)."""
    seen = set()
    for param_state in torch_optimizer.state.values():
        step = param_state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                param_state["step"] = step.clone()
            seen.add(id(step))


def _swaps():
    cls = _distrib_optimizer().DistributedOptimizer
    set_states, load_state_dict = cls._set_main_param_and_optimizer_states, cls.load_state_dict

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state[main_param].get("step")
        if step is not None and "step" not in tensors:
            tensors = {**tensors, "step": step}  # copied onto itself: unchanged
        return set_states(self, model_param, tensors)

    def _load_state_dict(self, state_dict):
        result = load_state_dict(self, state_dict)
        _unshare_steps(self.optimizer)
        return result

    return [(cls, "_set_main_param_and_optimizer_states", _set_main_param_and_optimizer_states),
            (cls, "load_state_dict", _load_state_dict)]


PATCH = Patch(
    "distopt_step_load",
    target=("megatron-core 0.16.1: DistributedOptimizer._set_main_param_and_optimizer_states "
            "and load_state_dict, without Apex/Transformer Engine"),
    why=__doc__,
    obsolete_when=(
        "is_needed() returns False (the source no longer copies every destination key nor "
        "assigns one `step` tensor to every state, or Apex/TE is in use) and a resume of a "
        "distributed-optimizer run matches uninterrupted training (tests/test_checkpoint.py)."
    ),
    probe=_probe,
    swaps=_swaps,
)
