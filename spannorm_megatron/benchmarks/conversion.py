"""`spannorm-benchmark-conversion` (tools/benchmark_conversion.py): the Hugging Face conversion's
time and peak memory against checkpoint size.

Example:
    spannorm-benchmark-conversion                       # small, medium, deep, large, moe
    spannorm-benchmark-conversion --sizes small,medium --json bench.json

For each model size: a random-weight checkpoint is written (checkpoint package, single process;
not timed), then converted megatron -> HF (spannorm-convert-to-hf's engine) and HF -> megatron
(convert_from_hf, TP1/PP1, one process), each in a fresh process that reports its wall time and
its peak resident memory (VmHWM), also as growth over the same process's memory just before the
conversion started (torch, megatron-core and transformers imported). Prints a table and, with
--json, writes every number. Checksums are verified on export (the manifest's CRC-32 pass reads
the checkpoint once more; --no-verify-checksums leaves it out).

What to expect: both directions stream one tensor group (embedding, one layer, final norm +
output layer) at a time, so memory growth tracks the largest group (a few times it in float32
while converting), not the checkpoint: `deep` has medium's groups and four times its layers.
The export reads the dist checkpoint a group at a time; the import describes the model on the
meta device and writes each shard as it converts it (checkpoint/streaming.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.hf.cli import run_cli
from spannorm_megatron.config.options import add_arguments, option, parse_sections

SIZES = {  # name -> ModelConfig overrides
    "small": dict(num_layers=4, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1408),
    "medium": dict(num_layers=8, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816),
    "large": dict(num_layers=8, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632),
    # medium's tensor groups, four times the layers: memory should follow the groups, not this.
    "deep": dict(num_layers=32, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816),
    "moe": dict(num_layers=4, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816,
                num_experts=8, moe_ffn_hidden_size=1408, moe_router_topk=2),
}
COMMON = dict(norm_placement="spannorm", vocab_size=32000, num_query_groups=4,
              max_sequence_length=2048, transformer_impl="local")


def _rss_mib() -> dict:
    from spannorm_megatron.metrics.memory import current_rss_bytes, peak_rss_bytes

    return {"VmRSS": current_rss_bytes() / 2**20, "VmHWM": peak_rss_bytes() / 2**20}


def _stage_create(size: str, ckpt: str) -> dict:
    import torch

    from spannorm_megatron.checkpoint import save_checkpoint
    from spannorm_megatron.config.model import ModelConfig
    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.model import build_gpt_model, transformer_config
    from spannorm_megatron.process import initialize

    initialize(seed=1)
    config = ModelConfig.recommended(**COMMON, **SIZES[size])
    model = build_gpt_model(config, transformer_config(config))
    params = sum(p.numel() for p in model.parameters())
    save_checkpoint(ckpt, 1, [model], None, None, model_config=config,
                    parallel_config=ParallelConfig(), consumed_train_samples=0, no_save_rng=True)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"parameters": params}


def _stage_export(ckpt: str, out: str, verify: bool) -> dict:
    import transformers  # noqa: F401 - imported before the baseline: the conversion needs it

    from spannorm_megatron.hf.export import export_checkpoint
    from spannorm_megatron.hf.megatron_reader import MegatronCheckpoint

    probe = MegatronCheckpoint(ckpt, verify_checksums=False)
    largest = max(sum(_numel(s) for _n, s in g.params) * 4 for g in probe.groups)
    del probe
    before = _rss_mib()
    start = time.perf_counter()
    export_checkpoint(ckpt, out, verify_checksums=verify, log=lambda line: None)
    seconds = time.perf_counter() - start
    after = _rss_mib()
    return {"seconds": seconds, "baseline_mib": before["VmRSS"], "peak_mib": after["VmHWM"],
            "growth_mib": after["VmHWM"] - before["VmRSS"], "largest_group_mib": largest / 2**20}


def _stage_import(hf: str, ckpt: str) -> dict:
    import transformers  # noqa: F401

    from spannorm_megatron.hf.importer import convert_hf_to_megatron
    from spannorm_megatron.model import build_gpt_model  # noqa: F401 - megatron imported

    before = _rss_mib()
    start = time.perf_counter()
    convert_hf_to_megatron(hf, ckpt, log=lambda line: None)
    seconds = time.perf_counter() - start
    after = _rss_mib()
    return {"seconds": seconds, "baseline_mib": before["VmRSS"], "peak_mib": after["VmHWM"],
            "growth_mib": after["VmHWM"] - before["VmRSS"]}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _dirs, names in os.walk(path) for name in names)


def _child(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "spannorm_megatron.benchmarks.conversion",
                             "--stage", *args],
                            capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                "OMP_NUM_THREADS", str(os.cpu_count() or 1))})
    if result.returncode:
        raise SystemExit(f"stage {args[0]} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class ConversionBenchmarkOptions:
    """The command line of `spannorm-benchmark-conversion`."""

    sizes: str = option("small,medium,deep,large,moe", f"Comma-separated, from {list(SIZES)}.")
    work_dir: Optional[str] = option(None, "Where checkpoints go (default: a temp dir).",
                                     path="output_folder")
    json: Optional[str] = option(None, "Write the results here.", metavar="FILE",
                                 path="output_file")
    no_verify_checksums: bool = option(False, "Check file sizes only on export, skip the "
                                       "checksum pass.")
    keep: bool = option(False, "Keep the checkpoints and folders.")
    stage: Optional[List[str]] = option(None, argparse.SUPPRESS, nargs="+")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, ConversionBenchmarkOptions)
    return parser


def benchmark(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and measure (or, with the hidden --stage, run one stage in this process)."""
    (options,) = parse_sections(build_parser(), [ConversionBenchmarkOptions], argv)
    if options.stage:
        stage, *rest = options.stage
        if stage == "create":
            out = _stage_create(*rest)
        elif stage == "export":
            out = _stage_export(rest[0], rest[1], rest[2] == "1")
        else:
            out = _stage_import(*rest)
        print(json.dumps(out))
        return 0

    sizes = [s.strip() for s in options.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        print(f"error: unknown size(s) {unknown}; choose from {list(SIZES)}", file=sys.stderr)
        return 2
    work = options.work_dir or tempfile.mkdtemp(prefix="spannorm-bench-")
    rows = []
    try:
        for size in sizes:
            base = os.path.join(work, size)
            shutil.rmtree(base, ignore_errors=True)
            ckpt, hf, back = (os.path.join(base, n) for n in ("ckpt", "hf", "back"))
            created = _child("create", size, ckpt)
            export = _child("export", ckpt, hf, "0" if options.no_verify_checksums else "1")
            imported = _child("import", hf, back)
            row = {"size": size, "config": {**COMMON, **SIZES[size]},
                   "parameters": created["parameters"],
                   "checkpoint_mib": _dir_bytes(ckpt) / 2**20, "hf_mib": _dir_bytes(hf) / 2**20,
                   "export": export, "import": imported}
            rows.append(row)
            print(f"{size}: done", file=sys.stderr, flush=True)
            if not options.keep:
                shutil.rmtree(base, ignore_errors=True)
    finally:
        if not options.keep and options.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    header = (f"{'size':<8}{'params':>12}{'ckpt MiB':>10}{'group MiB':>10}"
              f"{'export s':>10}{'exp peak':>10}{'exp +RSS':>10}"
              f"{'import s':>10}{'imp peak':>10}{'imp +RSS':>10}")
    print(header)
    for r in rows:
        e, i = r["export"], r["import"]
        print(f"{r['size']:<8}{r['parameters']:>12,}{r['checkpoint_mib']:>10.0f}"
              f"{e['largest_group_mib']:>10.0f}{e['seconds']:>10.1f}{e['peak_mib']:>10.0f}"
              f"{e['growth_mib']:>10.0f}{i['seconds']:>10.1f}{i['peak_mib']:>10.0f}"
              f"{i['growth_mib']:>10.0f}")
    print("(peak = VmHWM of the converting process, MiB; +RSS = peak minus its resident memory "
          "just before converting; group = largest tensor group in float32)")
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"machine": {"cpus": os.cpu_count()}, "results": rows}, f, indent=2)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
