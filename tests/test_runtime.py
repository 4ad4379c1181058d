"""Tests for spannorm_megatron.runtime: device choice, process groups, the CPU runtime.

What is checked, and where:
- in this process: the device decision and layout validation, nothing that enables the CPU
  runtime (pytest's process may hold a one-rank world from tests/conftest.py already);
- in one fresh interpreter (tests/_runtime_single.py): importing patches nothing, enabling is
  a no-op when an accelerator is reported, a bad layout fails before any process group; the
  CPU runtime's redirects (each patch alone, applied and reverted: tests/test_patches.py);
- in one torchrun launch per world size (tests/_runtime_worker.py): megatron-core's GPTModel
  trained with DDP, megatron optimizers and get_forward_backward_func() under TP, SP, PP,
  interleaved PP, EP (MoE, alltoall) and DP with the distributed optimizer, on 2 and 4 ranks.
  Each launch costs ~10 s of imports on 2 cores, so every launch runs many scenarios.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import launch
from spannorm_megatron import process, runtime
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.runtime import distributed as runtime_distributed

SEED = 1234

TWO_RANK = ["tp2_bf16", "tp2_sp", "pp2", "pp2_vpp2", "ep2_moe", "dp2_distopt"]
FOUR_RANK = ["tp2_pp2_sp_distopt", "tp2_ep2_sp_moe_distopt"]


# Upstream's warnings in the launched processes would bury a rank's traceback.
QUIET = {"PYTHONWARNINGS": "ignore"}


def _launch(nproc: int, scenarios: list[str], out_dir) -> dict[int, dict]:
    proc = launch.torchrun(launch.TESTS / "_runtime_worker.py", out_dir, *scenarios,
                           nproc=nproc, env=QUIET, cwd=launch.ROOT)
    launch.check_launch(proc, out_dir)
    return dict(enumerate(launch.rank_results(out_dir, nproc)))


@pytest.fixture(scope="module")
def two_ranks(torchrun, tmp_path_factory):
    return _launch(2, TWO_RANK, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_ranks(torchrun, tmp_path_factory):
    return _launch(4, FOUR_RANK, tmp_path_factory.mktemp("four_ranks"))


def run_single(script: str) -> dict:
    """The JSON report on the last stdout line of a fresh interpreter running tests/`script`."""
    proc = launch.python(launch.TESTS / script, env=QUIET, cwd=launch.ROOT, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{script} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single(slow):
    return run_single("_runtime_single.py")


def _ranks(results: dict[int, dict], scenario: str) -> list[dict]:
    return [results[r][scenario] for r in sorted(results)]


def _draws(seed: int) -> list[float]:
    return torch.rand(4, generator=torch.Generator().manual_seed(seed)).tolist()


def _close(a, b, rel=1e-6) -> bool:
    return all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-9) for x, y in zip(a, b, strict=True))


# --- in-process: decisions and validation ------------------------------------------------------


def test_this_machine_is_cpu_only():
    assert not runtime.has_accelerator()
    assert runtime.device_type() == "cpu"
    assert runtime.backend() == "gloo"
    assert runtime.current_device() == torch.device("cpu")
    assert runtime.megatron_device_kwargs() == {"use_cpu_initialization": True}


def test_force_cpu_env_vetoes_accelerator(monkeypatch):
    monkeypatch.setenv("SPANNORM_FORCE_CPU", "1")
    assert not runtime.has_accelerator()
    assert runtime.backend() == "gloo"


def test_cpu_runtime_decision():
    assert process.should_enable_cpu_runtime(accelerator_present=False)
    assert not process.should_enable_cpu_runtime(accelerator_present=True)


def test_megatron_device_kwargs_with_accelerator(monkeypatch):
    monkeypatch.setattr(runtime_distributed, "has_accelerator", lambda: True)
    assert runtime.megatron_device_kwargs() == {}


@pytest.mark.parametrize(
    "world, kwargs, expected",
    [
        (2, dict(tensor_model_parallel_size=4), ["world size 2", "tensor_model_parallel_size (4)", "= 4"]),
        (6, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
         ["world size 6", "pipeline_model_parallel_size (2)", "= 4"]),
        (2, dict(expert_model_parallel_size=4),
         ["world size 2", "expert_model_parallel_size (4)", "expert_tensor_parallel_size (1)"]),
        (4, dict(virtual_pipeline_model_parallel_size=2),
         ["virtual_pipeline_model_parallel_size (2)", "pipeline_model_parallel_size > 1 (got 1)"]),
        (2, dict(context_parallel_size=0), ["context_parallel_size", "positive integer", "0"]),
    ],
)
def test_layout_errors_name_sizes(world, kwargs, expected):
    with pytest.raises(runtime.ParallelLayoutError) as err:
        cp = kwargs.pop("context_parallel_size", 1)
        runtime.validate_layout(world, ParallelConfig(**kwargs), context_parallel_size=cp)
    assert isinstance(err.value, ValueError)
    for text in expected:
        assert text in str(err.value)


def test_valid_layout_derives_data_parallel_sizes():
    layout = runtime.validate_layout(8, ParallelConfig(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
        expert_model_parallel_size=2, expert_tensor_parallel_size=1))
    assert (layout.data_parallel_size, layout.expert_data_parallel_size) == (2, 2)


# --- fresh interpreter: patches and CPU runtime redirects ---------------------------------------


def test_importing_changes_nothing(single):
    """GPU path untouched: importing the runtime and the patches package patches nothing."""
    assert single["pristine"]["after_import"]


def test_without_a_gpu_megatron_cores_jit_fuser_compiles_nothing(single):
    """Decided as megatron-core loads (spannorm_megatron/machine.py): its fusions are GPU
    kernels, and compiling them on CPU only imported TorchDynamo and Inductor (1.4 s of CPU in
    every process)."""
    assert single["pristine"]["jit_fuser"] == {
        "cpu": True, "inductor_imported": False, "gpu_keeps_torch_compile": True}


def test_enable_cpu_runtime_is_noop_with_accelerator(single):
    p = single["pristine"]
    assert p["enable_with_accelerator"] is False
    assert p["after_enable_with_accelerator"]


def test_initialize_validates_before_any_process_group(single):
    p = single["pristine"]
    assert "world size 2" in p["bad_layout_error"] and "= 3" in p["bad_layout_error"]
    assert p["after_bad_layout"] and p["patches_untouched"]
    assert p["enabled_after_bad_layout"] is False


def test_runtime_alone_refuses_without_the_cpu_runtime(single):
    """The runtime never imports patches/: initialized without the entry point's patch sets on a
    machine without a GPU it stops before any process group, naming the call that applies them."""
    p = single["pristine"]
    assert "spannorm_megatron.process.initialize()" in p["unpatched_error"]
    assert p["after_unpatched"]


def test_cpu_runtime_redirects(single):
    c = single["cpu"]
    assert c["enabled_before"] is False and c["enable"] is True and c["enable_again"] is True
    assert c["modes_on_stack"] == 1, "enable_cpu_runtime must not stack the mode twice"
    assert c["cuda_is_available"] is False, "the CPU stands in for CUDA; it must not claim CUDA"
    for key in ("factory_device", "int_device", "to_cuda", "dot_cuda"):
        assert c[key] == "cpu", key
    assert c["meta_untouched"] == "meta"
    assert c["type_name"] == "torch.cuda.FloatTensor" and c["type_cast"]
    assert c["backward_tensor"] and c["backward_autograd"] and c["backward_grad"]
    assert c["thread"] == {"without_enable": False, "with_enable": "cpu"}
    assert c["rng_matches_cpu_seed"] and c["rng_state_roundtrip"] and c["streams"]
    assert c["single_world"] == 1 and c["backend"] == "gloo" and c["destroyed"]
    assert c["tracker"] == {
        "fork_uses_model_parallel_seed": True,
        "default_resumes_after_fork": True,
        "warnings": [],
    }


# --- torchrun, 2 ranks -------------------------------------------------------------------------


def _assert_trained(per_rank: list[dict], scenario: str):
    with_loss = [r for r in per_rank if r["losses"]]
    assert with_loss, f"{scenario}: no rank reported a loss"
    for r in with_loss:
        losses = r["losses"]
        assert all(math.isfinite(x) for x in losses), f"{scenario}: {losses}"
        assert losses[-1] < losses[0] - 0.2, f"{scenario}: loss did not decrease: {losses}"
    for r in per_rank:
        assert all(math.isfinite(g) for g in r["grad_norms"]), f"{scenario}: {r['grad_norms']}"
        assert len(r["changed"]) == r["num_params"], f"{scenario}: some parameters never moved"


def _same_params(a: dict, b: dict, select) -> list[str]:
    names = [n for n in a["params"] if select(a["params"][n])]
    assert names
    return [n for n in names if a["params"][n]["fingerprint"] != b["params"][n]["fingerprint"]]


@pytest.mark.parametrize("scenario", TWO_RANK)
def test_two_rank_training_converges(two_ranks, scenario):
    _assert_trained(_ranks(two_ranks, scenario), scenario)
    assert all(two_ranks[r]["_cpu_runtime"] for r in two_ranks)


@pytest.mark.parametrize("scenario", ["tp2_bf16", "tp2_sp"])
def test_tensor_parallel_ranks_agree(two_ranks, scenario):
    r0, r1 = _ranks(two_ranks, scenario)
    assert (r0["ranks"]["tp"], r1["ranks"]["tp"]) == (0, 1)
    assert r0["losses"] == r1["losses"]
    assert _same_params(r0, r1, lambda p: not p["tp_split"]) == []
    # the split weights are genuinely different shards
    assert len(_same_params(r0, r1, lambda p: p["tp_split"])) > 0


def test_tensor_parallel_matches_data_parallel_forward(two_ranks):
    """Same seed, same first batch: TP2 (with SP) and the TP1 model of DP rank 0 must give the
    same first loss (use_cpu_initialization makes the init independent of TP)."""
    tp = _ranks(two_ranks, "tp2_sp")[0]["losses"][0]
    dp = [r for r in _ranks(two_ranks, "dp2_distopt")
          if r["ranks"]["dp"] == 0][0]["local_losses"][0]
    assert math.isclose(tp, dp, rel_tol=1e-5)
    bf16 = _ranks(two_ranks, "tp2_bf16")[0]["losses"][0]
    assert math.isclose(tp, bf16, rel_tol=1e-2)


def test_rng_streams_follow_megatron_semantics(two_ranks):
    """Default stream equal across TP ranks; model-parallel stream seeded seed+2718+tp_rank;
    expert stream seed+1024+100*ep_rank+etp_rank; pipeline stages offset the seed by 100."""
    for r in _ranks(two_ranks, "tp2_sp"):
        tp = r["ranks"]["tp"]
        assert _close(r["rng"]["default"], _draws(SEED))
        assert _close(r["rng"]["model_parallel"], _draws(SEED + 2718 + tp))
    for r in _ranks(two_ranks, "ep2_moe"):
        assert _close(r["rng"]["expert"], _draws(SEED + 1024 + 100 * r["ranks"]["ep"]))
    for r in _ranks(two_ranks, "pp2"):
        assert _close(r["rng"]["default"], _draws(SEED + 100 * r["ranks"]["pp"]))


def test_interleaved_pipeline_reproduces_1f1b(two_ranks):
    """pp2 and pp2_vpp2 start from identical weights and data; the interleaved schedule (with
    the pp2_batched_p2p_order patch) must give the same losses and the same final weights."""
    pp, vpp = _ranks(two_ranks, "pp2"), _ranks(two_ranks, "pp2_vpp2")
    last_pp = [r for r in pp if r["losses"]][0]
    last_vpp = [r for r in vpp if r["losses"]][0]
    assert _close(last_pp["losses"], last_vpp["losses"], rel=1e-5)
    for a, b in zip(pp, vpp):
        assert a["ranks"]["pp"] == b["ranks"]["pp"]
        # Stage 0 holds layers 1,2 under 1F1B but layers 1,3 under vpp: compare what is shared.
        for name in set(a["params"]) & set(b["params"]):
            assert _close(a["params"][name]["fingerprint"], b["params"][name]["fingerprint"], 1e-4), name


def test_tied_embeddings_stay_tied_across_stages(two_ranks):
    for scenario in ("pp2", "pp2_vpp2"):
        first, last = sorted(_ranks(two_ranks, scenario), key=lambda r: r["ranks"]["pp"])
        emb = first["params"]["embedding.word_embeddings.weight"]["fingerprint"]
        out = last["params"]["output_layer.weight"]["fingerprint"]
        assert emb == out, scenario


def test_batched_p2p_pairing_bug_reproduces_over_gloo(two_ranks):
    for r in _ranks(two_ranks, "pp2"):
        pairing, peer = r["p2p_pairing"], r["p2p_pairing"]["peer"]
        # unpatched megatron: the peer's gradient lands in the activation buffer
        assert pairing["unpatched"] == {"recv_prev": 100.0 + peer, "recv_next": 200.0 + peer}
        assert pairing["patched"] == {"recv_prev": 200.0 + peer, "recv_next": 100.0 + peer}
        assert r["patches"] == ["moe_router_gemm", "pp2_batched_p2p_order", "distopt_step_load",
                                "checkpoint_results_queue", "expert_bias_inplace"]


def test_expert_parallel_moe(two_ranks):
    r0, r1 = _ranks(two_ranks, "ep2_moe")
    assert (r0["ranks"]["ep"], r1["ranks"]["ep"]) == (0, 1)
    assert any(p["expert"] for p in r0["params"].values())
    # dense weights are data-parallel replicas; each rank owns different experts
    assert _same_params(r0, r1, lambda p: not p["expert"]) == []
    assert len(_same_params(r0, r1, lambda p: p["expert"])) > 0
    assert r0["local_losses"] != r1["local_losses"]  # different data per data-parallel rank
    assert r0["losses"] == r1["losses"]  # logged: reduced over the data-parallel ranks


def test_data_parallel_distributed_optimizer_keeps_replicas_identical(two_ranks):
    r0, r1 = _ranks(two_ranks, "dp2_distopt")
    assert (r0["ranks"]["dp"], r1["ranks"]["dp"]) == (0, 1)
    assert r0["local_losses"] != r1["local_losses"]
    assert r0["losses"] == r1["losses"]
    assert r0["grad_norms"] == r1["grad_norms"]
    assert _same_params(r0, r1, lambda p: True) == []


# --- torchrun, 4 ranks -------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", FOUR_RANK)
def test_four_rank_training_converges(four_ranks, scenario):
    _assert_trained(_ranks(four_ranks, scenario), scenario)


def test_four_rank_tp2_pp2(four_ranks):
    per_rank = _ranks(four_ranks, "tp2_pp2_sp_distopt")
    by_pos = {(r["ranks"]["pp"], r["ranks"]["tp"]): r for r in per_rank}
    assert set(by_pos) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert by_pos[(1, 0)]["losses"] == by_pos[(1, 1)]["losses"]
    for pp in (0, 1):
        assert _same_params(by_pos[(pp, 0)], by_pos[(pp, 1)], lambda p: not p["tp_split"]) == []
    for tp in (0, 1):  # each TP shard of the tied embedding matches its output-layer shard
        emb = by_pos[(0, tp)]["params"]["embedding.word_embeddings.weight"]["fingerprint"]
        assert emb == by_pos[(1, tp)]["params"]["output_layer.weight"]["fingerprint"]


def test_four_rank_tp2_ep2_moe(four_ranks, two_ranks):
    per_rank = _ranks(four_ranks, "tp2_ep2_sp_moe_distopt")
    by_pos = {(r["ranks"]["dp"], r["ranks"]["tp"]): r for r in per_rank}
    assert set(by_pos) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for tp in (0, 1):  # dense replicas agree across data-parallel ranks
        assert _same_params(by_pos[(0, tp)], by_pos[(1, tp)], lambda p: not p["expert"]) == []
    for dp in (0, 1):
        assert by_pos[(dp, 0)]["losses"] == by_pos[(dp, 1)]["losses"]
    # TP2 + SP MoE forward equals the TP1 MoE forward of the 2-rank run (same seed and data).
    ep2 = [r for r in _ranks(two_ranks, "ep2_moe") if r["ranks"]["dp"] == 0][0]
    assert math.isclose(by_pos[(0, 0)]["local_losses"][0], ep2["local_losses"][0],
                        rel_tol=1e-5)


def test_launch_checks_before_any_process_group(monkeypatch):
    """One rank per GPU, and only the backend the device can use, refused with the fix named."""
    from spannorm_megatron.errors import ConfigError
    from spannorm_megatron.runtime import check_launch, ranks_per_node
    from spannorm_megatron.runtime import device as runtime_device

    assert ranks_per_node(2) == 2  # CPU: the quickstart's two gloo ranks
    check_launch(None)
    check_launch("gloo")
    with pytest.raises(ConfigError, match="--distributed-backend nccl needs GPUs"):
        check_launch("nccl")
    monkeypatch.setenv("SPANNORM_FORCE_CPU", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="SPANNORM_FORCE_CPU is set"):
        check_launch("nccl")
    # What a node with one GPU reports: the quickstart starts one rank, a second is refused.
    monkeypatch.delenv("SPANNORM_FORCE_CPU")
    monkeypatch.setattr(runtime_device, "has_accelerator", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ranks_per_node(2) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="runs 2 ranks .* has 1 GPU"):
        check_launch(None)
    with pytest.raises(ConfigError, match="--distributed-backend gloo on GPUs"):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        check_launch("gloo")


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 in the environment"),
    ({"WORLD_SIZE": "x"}, "WORLD_SIZE='x' in the environment is not a non-negative integer"),
    ({"RANK": "-1"}, "RANK='-1'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 in the environment is outside WORLD_SIZE=2"),
    ({"LOCAL_WORLD_SIZE": "0"}, "LOCAL_WORLD_SIZE=0"),
    ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 in the environment is outside LOCAL_WORLD_SIZE=1"),
])
def test_launch_variables_are_checked_naming_the_variable(monkeypatch, env, words):
    from spannorm_megatron.errors import ConfigError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(words)):
        runtime.launch_environment()
    with pytest.raises(ConfigError, match=re.escape(words)):
        runtime.check_launch()


def test_launch_variables_default_to_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert runtime.launch_environment() == runtime.LaunchEnvironment(0, 1, 0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert runtime.launch_environment().rank == 3
