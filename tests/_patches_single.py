"""Fresh-interpreter checks for tests/test_patches.py: every patch applied and reverted alone.

Patches alter process-wide state and pytest's own process may hold them already
(tests/conftest.py), so the upstream objects are captured here before anything applies them.
Each patch is then applied and reverted on its own; the targets it must alter are named below,
independently of the patch, and after revert every one must hold the very object it held
before (the whole namespace of each owner is compared, so a stray change shows too). Where a
defect can be shown without a process group it is shown before apply, gone after apply, and
back after revert. Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading

import megatron.core  # noqa: F401  (before this package: see below)
import torch
from torch.overrides import _get_current_function_mode_stack

# megatron-core is imported before spannorm_megatron here, as a program of a user's may do: its
# jit_fuser is then torch.compile (importing the package first makes it eager on CPU,
# spannorm_megatron/machine.py), which is what cpu_eager_expert_bias exists for.
from spannorm_megatron.process import enable_cpu_runtime, is_cpu_runtime_enabled, load_patches
from spannorm_megatron.runtime.strict_devices import STRICT_ENV

patches = load_patches()

# What each patch alters: (owner, attribute). Owners are dotted module paths, "module:Class",
# "logger:<name>" or "mode" (the CPU runtime's torch-function mode object).
_C10D = "torch.distributed.distributed_c10d"
EXPECTED = {
    "moe_router_gemm": [("megatron.core.transformer.moe.moe_utils", "te_general_gemm")],
    "expert_bias_inplace": [("megatron.core.tensor_parallel.layers",
                             "reduce_from_tensor_model_parallel_region")],
    "checkpoint_results_queue": [("megatron.core.dist_checkpointing.strategies.filesystem_async",
                                  "_get_write_results_queue")],
    "pp2_batched_p2p_order": [("megatron.core.pipeline_parallel.p2p_communication",
                               "_batched_p2p_ops")],
    "distopt_step_load": [
        ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer", attribute)
        for attribute in ("_set_main_param_and_optimizer_states", "load_state_dict")],
    "cpu_torch_cuda": [("torch.cuda", attribute) for attribute in (
        "current_device", "Stream", "Event", "current_stream", "default_stream", "stream",
        "synchronize")],
    "cpu_rng": [(namespace, attribute) for namespace in ("torch.cuda", "torch.cuda.random")
                for attribute in ("get_rng_state", "set_rng_state", "manual_seed")]
    + [("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
       ("logger:megatron.core.tensor_parallel.random", "filters")],
    "cpu_moe_split_sizes": [("megatron.core.transformer.moe.token_dispatcher",
                             "maybe_move_tensor_to_cpu")],
    "cpu_uneven_collectives": [("megatron.core.tensor_parallel.mappings", attribute) for attribute
                               in ("_gather_along_first_dim", "_reduce_scatter_along_first_dim")],
    "cpu_autograd_engine": [("torch.autograd", "_engine_run_backward")],
    "cpu_eager_expert_bias": [("megatron.core.transformer.moe.router:TopKRouter",
                               "_apply_expert_bias")],
    "cpu_device_arguments": [],  # the calling thread's mode stack, checked on its own
    "strict_collectives": [("mode", "strict"), ("torch.distributed", "new_group"),
                           (_C10D, "isend"), (_C10D, "irecv")]
    + [("torch.distributed", name) for name in (
        "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
        "reduce_scatter_tensor", "broadcast", "reduce", "gather", "scatter", "send", "recv",
        "isend", "irecv", "all_to_all", "all_to_all_single", "batch_isend_irecv",
        "_all_gather_base", "_reduce_scatter_base")],
    "strict_legacy_constructors": [("torch:Tensor", "__new__")] + [
        ("torch", name) for name in (
            "BFloat16Tensor", "BoolTensor", "ByteTensor", "CharTensor", "DoubleTensor",
            "FloatTensor", "HalfTensor", "IntTensor", "LongTensor", "ShortTensor")],
    "strict_threads": [("threading:Thread", "start")],
}


def _owner(label: str):
    if label == "mode":
        return patches.cpu_device_arguments.MODE
    if label.startswith("logger:"):
        return logging.getLogger(label[len("logger:"):])
    module, _, cls = label.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, cls) if cls else owner


def _raises(fn) -> bool:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the failure itself is the observation
        return True
    return False


def _router_fails() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return _raises(lambda: moe_utils.router_gating_linear(
        torch.randn(3, 2, 8), torch.randn(4, 8), None, torch.float32))


def _p2p_mispairs() -> bool:
    from megatron.core.pipeline_parallel import p2p_communication

    return not patches.pp2_batched_p2p_order.pairs_correctly(p2p_communication._batched_p2p_ops)


def _rng_not_cpu_generator() -> bool:
    if _raises(lambda: torch.cuda.manual_seed(5)):
        return True
    return not torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))


def _split_sizes_stay_tensors() -> bool:
    from megatron.core.transformer.moe import token_dispatcher

    return torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([2]),
                                                                     as_numpy=True))


def _results_queue_needs_a_server() -> bool:
    """A server process appears when the queue is made (and would outlive a killed trainer)."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    before = set(multiprocessing.active_children())
    saved, filesystem_async._results_queue = filesystem_async._results_queue, None
    try:
        filesystem_async._get_write_results_queue()
        started = set(multiprocessing.active_children()) - before
    finally:
        filesystem_async._results_queue = saved
    for child in started:
        child.terminate()
    return bool(started)


class _OneRank:
    """A tensor-parallel group of one rank, as RowParallelLinear passes it."""

    def size(self) -> int:
        return 1


def _expert_bias_cannot_be_added_in_place() -> bool:
    """MLP.forward's `output += bias * scale` on RowParallelLinear's reduced output."""
    import socket

    from megatron.core.tensor_parallel import layers

    with socket.socket() as probe:  # megatron-core reads the group only with torch.distributed up
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=0, world_size=1)
    try:
        output = layers.reduce_from_tensor_model_parallel_region(
            torch.ones(2, requires_grad=True) * 2, group=_OneRank())
        try:
            output += 1
        except RuntimeError:
            return True
        output.sum().backward()
        return False
    finally:
        torch.distributed.destroy_process_group()


def _legacy_constructors_unrecorded() -> bool:
    """Strict device mode cannot see what legacy constructors make: not recorded as host."""
    from spannorm_megatron.runtime.strict_devices import is_host

    return not (is_host(torch.FloatTensor([1.0])) and is_host(torch.Tensor([1.0])))


def _new_thread_without_the_mode() -> bool:
    """A thread started now has no CPU runtime mode on its stack."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(
        patches.cpu_device_arguments.mode_active()))
    thread.start()
    thread.join()
    return not seen[0]


# A defect each patch removes, observable without a process group: True while present.
DEFECTS = {
    "checkpoint_results_queue": _results_queue_needs_a_server,
    "moe_router_gemm": _router_fails,
    "expert_bias_inplace": _expert_bias_cannot_be_added_in_place,
    "pp2_batched_p2p_order": _p2p_mispairs,
    "cpu_torch_cuda": lambda: _raises(torch.cuda.current_device),
    "cpu_rng": _rng_not_cpu_generator,
    "cpu_moe_split_sizes": _split_sizes_stay_tensors,
    "cpu_device_arguments": lambda: _raises(lambda: torch.zeros(1, device="cuda")),
    "strict_legacy_constructors": _legacy_constructors_unrecorded,
    "strict_threads": _new_thread_without_the_mode,
}


def _namespaces(labels) -> dict:
    return {label: dict(vars(_owner(label))) for label in labels}


_NONE = object()


def _differences(before: dict, after: dict) -> list[str]:
    """Names whose objects differ (by identity) between two snapshots of one namespace."""
    return sorted(k for k in before.keys() | after.keys()
                  if before.get(k, _NONE) is not after.get(k, _NONE))


def check(patch) -> dict:
    expected = EXPECTED[patch.name]
    owners = sorted({label for label, _ in expected})
    originals = _namespaces(owners)
    defect = DEFECTS.get(patch.name)
    out = {"needed": patch.is_needed(), "defect_before": defect() if defect else None,
           "metadata": all(isinstance(v, str) and len(v) > 20
                           for v in (patch.target, patch.why, patch.obsolete_when)),
           "modes_before": len(_get_current_function_mode_stack())}
    out["apply"] = patch.apply()
    out["apply_again"] = patch.apply()
    out["applied"] = patch.is_applied()
    labels = {id(_owner(label)): label for label in owners}
    out["targets"] = sorted([labels.get(id(owner), repr(owner)), attribute]
                            for owner, attribute in patch.targets())
    out["expected"] = sorted([label, attribute] for label, attribute in expected)
    out["replaced"] = sorted(
        f"{label}.{attribute}" for label, attribute in expected
        if vars(_owner(label)).get(attribute, _NONE) is not originals[label].get(attribute, _NONE))
    out["needed_while_applied"] = patch.is_needed()
    out["defect_applied"] = defect() if defect else None
    out["modes_applied"] = len(_get_current_function_mode_stack())
    out["revert"] = patch.revert()
    out["revert_again"] = patch.revert()
    changed = {label: _differences(originals[label], vars(_owner(label))) for label in owners}
    out["changed_after_revert"] = {label: names for label, names in changed.items() if names}
    out["defect_after_revert"] = defect() if defect else None
    out["needed_after_revert"] = patch.is_needed()
    out["modes_after"] = len(_get_current_function_mode_stack())
    return out


def check_strict_off() -> dict:
    """Without SPANNORM_STRICT_DEVICES the strict checks are not needed and apply nothing."""
    owners = sorted({label for patch in patches.STRICT_DEVICES for label, _ in EXPECTED[patch.name]
                     if label != "mode"})
    before = _namespaces(owners)
    out = {"needed": any(patch.is_needed() for patch in patches.STRICT_DEVICES),
           "apply": any([patch.apply() for patch in patches.STRICT_DEVICES])}
    out["unchanged"] = all(_differences(before[label], vars(_owner(label))) == []
                           for label in owners)
    return out


def check_sets() -> dict:
    """The CPU runtime as enable_cpu_runtime() applies it, then reverted as one set."""
    cuda = dict(vars(torch.cuda))
    out = {"enable": enable_cpu_runtime(), "enabled": is_cpu_runtime_enabled(),
           "applied": [p.name for p in patches.ALL if p.is_applied()]}
    out["reverted"] = patches.revert_all(patches.CPU_RUNTIME + patches.STRICT_DEVICES)
    out["enabled_after_revert"] = is_cpu_runtime_enabled()
    out["cuda_changed"] = _differences(cuda, vars(torch.cuda))
    out["modes_after"] = len(_get_current_function_mode_stack())
    out["upstream_applied"] = patches.apply_all()
    out["upstream_reverted"] = patches.revert_all()
    return out


def main() -> None:
    os.environ.pop(STRICT_ENV, None)
    result = {"names": [p.name for p in patches.ALL], "strict_off": check_strict_off()}
    os.environ[STRICT_ENV] = "1"
    result["patches"] = {patch.name: check(patch) for patch in patches.ALL}
    del os.environ[STRICT_ENV]
    result["sets"] = check_sets()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
