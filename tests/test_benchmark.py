"""tools/benchmark.py and tools/benchmark_conversion.py run on CPU (their smallest sizes) and
write their tables and JSON."""

import json
import os
import subprocess
import sys

import pytest
from launch import ROOT
from _training import STRICT_DEVICES


@pytest.mark.slow
def test_benchmark_tiny_preset_writes_table_and_json(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--preset", "tiny",
         "--placements", "spannorm", "--warmup", "1", "--iters", "2", "--rounds", "1",
         "--log-step-memory", "--output", str(output)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **STRICT_DEVICES})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| fp32 | spannorm |" in result.stdout and "| fp32 | prenorm |" in result.stdout
    data = json.loads(output.read_text())
    by_placement = {r["placement"]: r for r in data["results"]}
    assert set(by_placement) == {"prenorm", "spannorm"}
    assert by_placement["prenorm"]["tokens_per_second_vs_prenorm"] == 1.0
    for r in data["results"]:
        assert r["step_seconds"] > 0 and r["tokens_per_second"] > 0
        assert len(r["step_seconds_samples"]) == 2
        # On CPU each model's memory is measured in a child process of its own.
        assert r["peak_memory_bytes"] > 0 and r["memory_vs_prenorm"] > 0
        # --log-step-memory: one plain and one logging step of the run's monitor, measured.
        samples = r["step_memory_samples"]
        assert len(samples["plain"]) == len(samples["log"]) == 1
        assert r["plain_step_memory_bytes"] == samples["plain"][0] > 0
        assert r["log_step_memory_bytes"] == samples["log"][0] > 0
    assert "| fp32 | spannorm | " in result.stdout.split("logging step adds")[1]
    assert data["environment"]["megatron_core"]


def test_moe_benchmark_times_dispatchers_and_capacity_against_dense(torchrun, tmp_path):
    """Two expert-parallel ranks: every variant is timed in every round, and the dense baseline
    has the MoE models' active MLP FLOPs (top-k x the expert FFN)."""
    output = tmp_path / "moe.json"
    result = torchrun(
        ROOT / "tools" / "benchmark_moe.py", "--num-layers", "2",
        "--hidden-size", "64", "--moe-ffn-hidden-size", "64", "--vocab-size", "512",
        "--seq-length", "64", "--variants", "alltoall", "allgather_capacity_padded",
        "--warmup", "1", "--iters", "2", "--rounds", "2", "--output", output,
        timeout=600, env=STRICT_DEVICES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| allgather_capacity_padded | allgather | 1, padded |" in result.stdout
    data = json.loads(output.read_text())
    assert data["world_size"] == 2
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == ["dense", "alltoall", "allgather_capacity_padded"]
    assert rows["dense"]["vs_dense"] == 1.0
    for r in rows.values():
        assert len(r["step_seconds_samples"]) == 4 and r["tokens_per_second"] > 0
        assert r["vs_dense_min"] <= r["vs_dense"] <= r["vs_dense_max"]
    # The router's FLOPs are the only difference; EP2 splits the 8 experts over the ranks.
    assert rows["alltoall"]["flops_per_token"] == pytest.approx(rows["dense"]["flops_per_token"],
                                                                rel=0.02)
    assert rows["alltoall"]["parameters"] > rows["dense"]["parameters"]


@pytest.mark.slow
def test_benchmark_refuses_fp8_without_transformer_engine():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--precisions", "fp8"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "fp8 needs Transformer Engine" in result.stderr


@pytest.mark.slow
def test_conversion_benchmark_small_size_writes_table_and_json(tmp_path):
    output = tmp_path / "conversion.json"
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark_conversion.py"), "--sizes",
         "small", "--work-dir", str(work), "--json", str(output)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[1].startswith("small ")
    (row,) = json.loads(output.read_text())["results"]
    assert row["parameters"] > 40_000_000 and row["checkpoint_mib"] > 100
    assert row["export"]["largest_group_mib"] > 0
    for direction in ("export", "import"):
        assert row[direction]["seconds"] > 0 and row[direction]["peak_mib"] > 0
    assert not (work / "small").exists()  # checkpoints and folders are removed without --keep


@pytest.mark.slow
def test_benchmark_frees_each_model_before_the_next(megatron_world):
    """The model, its optimizer and their reference cycle (the config's hooks point back at
    them) are gone after `close`, so the next placement is built in free memory."""
    import gc
    import weakref

    from spannorm_megatron.benchmarks import training as benchmark

    bench = benchmark.bench_for("spannorm", "fp32", benchmark.parse_options(["--preset", "tiny"]))
    bench.step()
    assert bench.transformer_impl == "local"
    model, optimizer = weakref.ref(bench.model[0]), weakref.ref(bench.optimizer)
    bench.close()
    gc.collect()
    assert model() is None and optimizer() is None
