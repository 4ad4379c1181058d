"""The patch contract (patches/): every alteration of upstream code, applied and reverted alone.

Runs tests/_patches_single.py in a fresh interpreter (pytest's process may hold patches
already) and judges its report: on the installed megatron-core 0.16.1, on this CPU-only machine,
every patch is needed (strict device mode's only when asked for); apply alters exactly the
targets listed in that script and removes the defect; revert puts back the very objects that
were there and the defect returns.
"""

from __future__ import annotations

import pytest
from test_runtime import run_single

NAMES = ["moe_router_gemm", "pp2_batched_p2p_order", "distopt_step_load",
         "checkpoint_results_queue", "expert_bias_inplace", "cpu_torch_cuda", "cpu_rng", "cpu_moe_split_sizes",
         "cpu_uneven_collectives", "cpu_autograd_engine", "cpu_eager_expert_bias",
         "cpu_device_arguments", "strict_collectives", "strict_legacy_constructors",
         "strict_threads"]
CPU_RUNTIME = NAMES[5:12]


@pytest.fixture(scope="module")
def report(slow):
    return run_single("_patches_single.py")


def test_registry_lists_every_patch(report):
    assert report["names"] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_patch_is_needed_applies_and_reverts_to_the_same_objects(report, name):
    r = report["patches"][name]
    assert r["metadata"], "target, why and obsolete_when must say something"
    assert r["needed"] is True, "megatron-core 0.16.1 on a CPU machine needs every patch"
    assert (r["apply"], r["apply_again"], r["applied"]) == (True, False, True)
    assert r["targets"] == r["expected"], "the patch alters other targets than listed"
    assert r["replaced"] == sorted(f"{o}.{a}" for o, a in r["expected"])
    # is_needed() judges upstream's own objects, so applying does not change its answer.
    assert r["needed_while_applied"] is True and r["needed_after_revert"] is True
    assert (r["revert"], r["revert_again"]) == (True, False)
    assert r["changed_after_revert"] == {}, "revert must restore the original objects"


@pytest.mark.parametrize("name", ["moe_router_gemm", "pp2_batched_p2p_order",
                                  "checkpoint_results_queue", "expert_bias_inplace", "cpu_torch_cuda",
                                  "cpu_rng", "cpu_moe_split_sizes", "cpu_device_arguments",
                                  "strict_legacy_constructors", "strict_threads"])
def test_patch_removes_its_defect_until_reverted(report, name):
    r = report["patches"][name]
    assert (r["defect_before"], r["defect_applied"], r["defect_after_revert"]) == (
        True, False, True)


def test_device_mode_is_pushed_and_popped_in_this_thread(report):
    r = report["patches"]["cpu_device_arguments"]
    assert (r["modes_before"], r["modes_applied"], r["modes_after"]) == (0, 1, 0)


def test_strict_checks_only_when_requested(report):
    assert report["strict_off"] == {"needed": False, "apply": False, "unchanged": True}


def test_cpu_runtime_is_one_revertible_set(report):
    s = report["sets"]
    assert s["enable"] is True and s["enabled"] is True
    assert s["applied"] == CPU_RUNTIME
    assert s["reverted"] == CPU_RUNTIME and s["enabled_after_revert"] is False
    assert s["cuda_changed"] == [] and s["modes_after"] == 0
    assert s["upstream_applied"] == s["upstream_reverted"] == NAMES[:5]
