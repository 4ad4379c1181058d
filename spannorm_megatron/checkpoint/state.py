"""What goes into the dist checkpoint, as megatron-core sharded state dicts (Megatron-LM's keys).

    model | model0, model1, ...   each model chunk's GPTModel.sharded_state_dict() (one key per
                                  virtual pipeline stage, as Megatron-LM names them)
    optimizer                     optimizer.sharded_state_dict(model state, is_loading=...)
    opt_param_scheduler           the LR/WD scheduler's state_dict()
    rng_state                     ShardedObject, see rng.py
    args                          Megatron-LM's argparse.Namespace, see megatron_args.py
    iteration, consumed_train_samples, consumed_valid_samples, checkpoint_version, run

Sharded tensor keys name *global* tensors (``decoder.layers.self_attention.linear_qkv.weight``
with the layer dimension global), so the nesting above does not matter for resharding: a
checkpoint saved as model0/model1 under interleaved pipelining loads as ``model`` in one process.

The optimizer state is saved in a fully reshardable form. For megatron-core's
DistributedOptimizer that is the ``fully_reshardable`` sharding type (Megatron-LM's
``--dist-ckpt-optim-fully-reshardable``, selected through
``metadata['distrib_optim_sharding_type']``): on save its flat per-DP-rank buffers are gathered
and cut back into tensors shaped like the model parameters, so every optimizer tensor is sharded
exactly like its parameter, under the parameter's key prefixed with ``optimizer.state.<name>.``.
The non-distributed optimizers already save that way. Such a checkpoint loads under any TP / PP /
EP / DP layout, optimizer state included. ``chained_optim_avoid_prefix`` keeps the keys free of
the chained-optimizer index, which depends on how parameters are grouped in a layout.
"""

from __future__ import annotations

from typing import Dict, List

CHECKPOINT_VERSION = 3.0
"""Megatron-LM's checkpoint_version for the torch_dist layout."""

SHARDING_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "distrib_optim_fully_reshardable_mem_efficient": False,
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
"""How the state dicts are built; saved as the checkpoint's content_metadata."""


def unwrap(chunk):
    """The GPTModel inside DDP (and any other ``.module`` wrappers)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_keys(num_chunks: int) -> List[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_state(model_chunks, metadata: dict) -> Dict[str, dict]:
    # A fresh metadata dict per call: megatron-core adds process groups to it in place.
    return {
        key: unwrap(chunk).sharded_state_dict(metadata=dict(metadata))
        for key, chunk in zip(model_keys(len(model_chunks)), model_chunks, strict=True)
    }


def optimizer_state(optimizer, model_sharded: dict, metadata: dict, is_loading: bool) -> dict:
    ensure_optimizer_state(optimizer)
    return optimizer.sharded_state_dict(model_sharded, is_loading=is_loading,
                                        metadata=dict(metadata))


def inner_optimizers(optimizer) -> list:
    """The optimizers a ChainedOptimizer holds (itself for a plain one)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def optimizer_kind(optimizer) -> str:
    """``distributed`` or ``local``: whether optimizer state is sharded over data parallel."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = inner_optimizers(optimizer)
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "local"


def optimizer_description(optimizer) -> dict:
    """What the run record keeps about the optimizer: its kind and how many megatron-core
    optimizers it chains (dense, and expert-parallel ones when EP > 1)."""
    return {"kind": optimizer_kind(optimizer), "chained": len(inner_optimizers(optimizer))}


def regroup_optimizer_state(loaded: dict, saved_common: dict, saved_chained: int, optimizer):
    """The loaded optimizer state in the shape `optimizer.load_state_dict` expects.

    megatron-core chains one optimizer for dense parameters and, when expert parallelism is on
    (EP > 1), a second one for expert parameters; with EP = 1 the experts sit in the dense one.
    The per-parameter tensors are keyed by parameter, so they load under either grouping, but
    the few non-tensor entries (param-group hyperparameters, Adam's step, the sharding type) are
    saved per chained optimizer. When the grouping changed, each current distributed optimizer
    gets all saved param groups, plus for an expert flag that no saved group has, a copy of the
    group with the other flag (hyperparameters do not depend on it), so that megatron-core's
    matching of groups by (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) finds one.
    """
    inner = inner_optimizers(optimizer)
    if saved_chained == len(inner):
        return loaded
    saved_parts = ([saved_common] if saved_chained == 1
                   else [saved_common[i] for i in range(saved_chained)])
    groups = [dict(g) for part in saved_parts for g in part["optimizer"]["param_groups"]]

    def ident(group, expert):
        return (group.get("wd_mult"), group.get("lr_mult"), expert, group.get("is_decoupled_lr"))

    present = {ident(g, g.get("is_expert_parallel")) for g in groups}
    for group in list(groups):
        flipped = not group.get("is_expert_parallel")
        if ident(group, flipped) not in present:
            groups.append({**group, "is_expert_parallel": flipped})
            present.add(ident(group, flipped))
    current = [loaded] if len(inner) == 1 else [loaded[i] for i in range(len(inner))]
    rebuilt = []
    for part in current:
        entry = {k: v for k, v in saved_parts[0].items() if k not in ("optimizer", "param_state")}
        entry["optimizer"] = {**saved_parts[0]["optimizer"], "param_groups": groups}
        entry["param_state"] = part["param_state"]
        rebuilt.append(entry)
    return rebuilt[0] if len(inner) == 1 else dict(enumerate(rebuilt))


def ensure_optimizer_state(optimizer) -> None:
    """Give a fresh (never stepped) distributed optimizer its zero state, without stepping.

    Without Apex or Transformer Engine (CPU runs), megatron-core's DistributedOptimizer wraps
    ``torch.optim.Adam(W)`` and its ``state_dict()`` -- which both saving and building the load
    request call -- requires every parameter's ``step``; a fresh optimizer has none yet.
    megatron-core's own fix-up (``_init_optimizer_states_with_dummy_values``) takes a real
    optimizer step, which with weight decay changes the weights before anything is known about
    the checkpoint. Zero moments and ``step = 0`` are exactly what Adam starts from, so this
    changes no result, and loading overwrites them anyway.
    """
    import torch
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(inner, distrib_optimizer.DistributedOptimizer):
            continue
        torch_optimizer = inner.optimizer
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        _fill_zero_adam_state(torch_optimizer)


def _fill_zero_adam_state(torch_optimizer) -> None:
    """What torch's Adam/AdamW create on their first step, for every parameter without state:
    zero moments beside the parameter, and ``step = 0`` on the host, where torch keeps it
    unless the optimizer is `capturable` (megatron-core's never is)."""
    import torch

    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            if len(torch_optimizer.state[param]) == 0:
                torch_optimizer.state[param].update(
                    step=torch.tensor(0.0),
                    exp_avg=torch.zeros_like(param, memory_format=torch.preserve_format),
                    exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
                )


def fill_fresh_optimizer_state(optimizer) -> None:
    """Give every parameter of a never-stepped optimizer (distributed or not) the state Adam
    starts from, so that a checkpoint saved before the first step (a rollback point at
    iteration 0) holds a complete optimizer state that later loads into a stepped one.

    torch's Adam/AdamW get zero moments and ``step = 0``, exactly what their first step would
    create; other inner optimizers (Apex / Transformer Engine FusedAdam) get megatron-core's
    own `init_state_fn`, zero moments with the step kept in their parameter groups."""
    import torch

    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        torch_optimizer = getattr(inner, "optimizer", None)
        if torch_optimizer is None:
            continue
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            inner.init_state_fn(torch_optimizer, inner.config)
            continue
        _fill_zero_adam_state(torch_optimizer)


def restore_zero_steps(optimizer_state) -> None:
    """Put back the ``step = 0`` of Adam states saved before the first step (in place).

    megatron-core's non-distributed optimizers save the step once for all parameters
    (``common_step``) and leave it out when it is 0 (``if step:``), so such a state loads into
    torch's Adam without the step it requires. Only states with moments and no step at all are
    touched."""
    import torch

    if isinstance(optimizer_state, dict):
        per_param = optimizer_state.get("state")
        if (isinstance(per_param, dict) and "common_step" not in per_param and per_param
                and all(isinstance(entry, dict) and "exp_avg" in entry and "step" not in entry
                        for entry in per_param.values())):
            for entry in per_param.values():
                entry["step"] = torch.tensor(0.0)
        for value in optimizer_state.values():
            restore_zero_steps(value)
