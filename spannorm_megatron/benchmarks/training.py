"""`spannorm-benchmark` (tools/benchmark.py): training-step speed and memory of each norm
placement, against PreNorm, in one run.

    spannorm-benchmark --preset tiny                              # CPU, a minute or two
    torchrun --nproc_per_node 1 tools/benchmark.py --preset 1.3b --precisions bf16 fp8
    torchrun --nproc_per_node 8 tools/benchmark.py --preset moe --expert-model-parallel-size 8

For every (precision, placement): build the model and megatron-core's DDP + optimizer, run
warm-up steps, time `--rounds` x `--iters` steps on a fixed synthetic batch, then free the model
before the next is built (one 1.3B model with its optimizer state takes ~25 GB: six at once do not
fit a GPU). Each result is the median over all timed steps; every step time is in the JSON, with
the `transformer_impl` that actually ran. Reported: step time, tokens/s, MFU, peak memory, and the
ratio of tokens/s and memory to PreNorm's at the same precision. Prints a table, writes JSON.

MFU is model FLOPs per second over the device's dense **bf16** peak for bf16 and FP8 runs alike
(fp32 runs: the fp32 peak), as the training log reports it, so FP8's gain shows as a higher MFU;
on CPU the peak is an estimate (spannorm_megatron.metrics.flops).

Peak memory is what one model adds while it is built and trained for the warm-up steps (weights,
gradients, optimizer state, activations): on a GPU the peak of allocated memory over what was
allocated before it was built; on CPU (one process only) the peak resident memory of a fresh
child process that builds that model alone, over the child's memory before building.

`--log-step-memory` adds, per row, what one step adds to the memory in use before it, for a
plain step and for a logging step of the training run's monitor (training.monitor.RunMonitor:
per-layer stability signals with their weight snapshot, MoE metrics), each the median over
`--rounds` alternating pairs: on a GPU the allocator's peak over what was allocated before the
step; on CPU the peak resident memory (reset before each step, Linux) over the resident memory
before it. On CPU the snapshot lives in the same memory as the model, so a logging step adds the
owned weights' size there; on a GPU it lives in host memory and adds only the update-ratio
slices (metrics/stability.py).

With `--output`, the JSON is rewritten after every row, so a run cut short keeps the rows it
finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from spannorm_megatron.benchmarks import harness
from spannorm_megatron.benchmarks.harness import IMPLS, Bench
from spannorm_megatron.benchmarks.step_memory import measure_step_memory
from spannorm_megatron.cli import run_cli
from spannorm_megatron.config.options import add_arguments, option, parse_sections
from spannorm_megatron.config.performance import FP8_FORMATS, FP8_RECIPES, RECOMPUTE_GRANULARITIES

PRECISIONS = ("fp32", "bf16", "fp8")
PRESETS = {
    # name: ModelConfig fields, default seq length, micro batch
    "tiny": (dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=384,
                  vocab_size=1024), 128, 4),
    "125m": (dict(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=2048,
                  vocab_size=50304), 2048, 4),
    "350m": (dict(num_layers=24, hidden_size=1024, num_attention_heads=16,
                  ffn_hidden_size=2816, vocab_size=50304), 2048, 4),
    "1.3b": (dict(num_layers=24, hidden_size=2048, num_attention_heads=16,
                  ffn_hidden_size=5632, vocab_size=50304), 2048, 2),
    "moe": (dict(num_layers=12, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816,
                 num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=1408,
                 moe_aux_loss_coeff=1e-2, moe_token_dispatcher_type="alltoall",
                 vocab_size=50304), 2048, 2),
}


MFU_REFERENCE = "dense bf16 peak of the device for bf16 and fp8 runs, fp32 peak for fp32 runs"


@dataclass
class Result:
    placement: str
    precision: str
    step_seconds: float
    tokens_per_second: float
    mfu: Optional[float]
    peak_memory_bytes: Optional[int]
    tokens_per_second_vs_prenorm: Optional[float] = None
    memory_vs_prenorm: Optional[float] = None
    step_seconds_samples: List[float] = field(default_factory=list)
    """Every timed step, in order (the spread says how far the median can be trusted)."""
    transformer_impl: str = "local"
    """The layers that ran: 'transformer_engine' or 'local' (what --transformer-impl auto chose)."""
    plain_step_memory_bytes: Optional[int] = None
    """With --log-step-memory: median memory a plain step adds to what was in use before it."""
    log_step_memory_bytes: Optional[int] = None
    """With --log-step-memory: the same for a logging step (stability signals, MoE metrics)."""
    step_memory_samples: dict = field(default_factory=dict)
    """With --log-step-memory: {'plain': [...], 'log': [...]}, bytes per measured step."""


@dataclass
class BenchmarkOptions:
    """The command line of `spannorm-benchmark`."""

    preset: str = option("tiny", "Model size (ModelConfig fields, sequence length, micro batch).",
                         choices=tuple(sorted(PRESETS)))
    placements: Optional[List[str]] = option(
        None, "Default: every registered placement (prenorm always included).", nargs="+")
    precisions: List[str] = option(doc="Precisions to run, each against PreNorm's.", nargs="+",
                                   choices=PRECISIONS, default_factory=lambda: ["fp32"])
    fp8_format: str = option("hybrid", "FP8 format of the fp8 runs.", choices=FP8_FORMATS)
    fp8_recipe: str = option("delayed", "FP8 scaling recipe of the fp8 runs.",
                             choices=tuple(FP8_RECIPES))
    seq_length: Optional[int] = option(None, "Default: the preset's.", at_least=1)
    micro_batch_size: Optional[int] = option(None, "Default: the preset's.", at_least=1)
    num_microbatches: int = option(1, "Micro-batches per step.", at_least=1)
    warmup: int = option(3, "Untimed steps per model.", at_least=0)
    iters: int = option(5, "Timed steps per round.", at_least=1)
    rounds: int = option(3, "Timed steps per model: --rounds x --iters.", at_least=1)
    tensor_model_parallel_size: int = option(1, "Tensor-parallel ranks.", at_least=1)
    pipeline_model_parallel_size: int = option(1, "Pipeline stages.", at_least=1)
    expert_model_parallel_size: int = option(1, "Expert-parallel ranks.", at_least=1)
    sequence_parallel: bool = option(False, "Megatron-LM's --sequence-parallel.")
    use_distributed_optimizer: bool = option(False, "Megatron-LM's --use-distributed-optimizer.")
    recompute_granularity: Optional[str] = option(None, "Megatron-LM's --recompute-granularity.",
                                                  choices=RECOMPUTE_GRANULARITIES)
    overlap_grad_reduce: bool = option(False, "Megatron-LM's --overlap-grad-reduce.")
    overlap_param_gather: bool = option(False, "Megatron-LM's --overlap-param-gather.")
    transformer_impl: str = option("auto", "Layers: auto (Transformer Engine where it runs), "
                                   "local or transformer_engine.", choices=IMPLS)
    no_memory: bool = option(
        False, "On CPU, skip the per-model memory measurement (a child process each).")
    log_step_memory: bool = option(
        False, "Also measure what a logging step (stability signals, MoE metrics) adds to the "
        "memory in use, against a plain step: the median of --rounds pairs.")
    output: Optional[str] = option(None, "JSON file for the results.", path="output_file")
    memory_probe: bool = option(False, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, BenchmarkOptions)
    return parser


def parse_options(argv=None) -> BenchmarkOptions:
    (options,) = parse_sections(build_parser(), [BenchmarkOptions], argv)
    return options


def parallel_layout(options: BenchmarkOptions):
    from spannorm_megatron.config.parallel import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=options.tensor_model_parallel_size,
                          pipeline_model_parallel_size=options.pipeline_model_parallel_size,
                          expert_model_parallel_size=options.expert_model_parallel_size,
                          sequence_parallel=options.sequence_parallel,
                          use_distributed_optimizer=options.use_distributed_optimizer)


def performance_for(precision: str, options: BenchmarkOptions):
    """The run's `PerformanceConfig` at one precision of --precisions."""
    from spannorm_megatron.config.performance import PerformanceConfig

    return PerformanceConfig(
        bf16=precision != "fp32",
        fp8_format=options.fp8_format if precision == "fp8" else None,
        fp8_recipe=options.fp8_recipe,
        recompute_granularity=options.recompute_granularity,
        overlap_grad_reduce=options.overlap_grad_reduce,
        overlap_param_gather=options.overlap_param_gather,
    )


def bench_for(placement: str, precision: str, options: BenchmarkOptions) -> Bench:
    """One placement's model at one precision, with the preset's shape and the options'
    layout."""
    model_fields, default_seq, default_micro = PRESETS[options.preset]
    seq_length = options.seq_length or default_seq
    model = harness.benchmark_model(placement, model_fields, seq_length,
                                    options.transformer_impl)
    return Bench(model, parallel_layout(options), performance_for(precision, options),
                 seq_length=seq_length,
                 micro_batch=options.micro_batch_size or default_micro,
                 num_microbatches=options.num_microbatches)


def _start_memory_measurement() -> Optional[int]:
    """Memory allocated now, with the peak counter reset to it (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def _memory_added_since(start: Optional[int]) -> Optional[int]:
    if start is None:
        return None
    import torch

    return int(torch.cuda.max_memory_allocated()) - start


def _cpu_memory_probe(options: BenchmarkOptions, placement: str, precision: str) -> Optional[int]:
    """Peak resident memory one model adds, measured in a fresh process (see the docstring)."""
    child = [sys.executable, "-m", "spannorm_megatron.benchmarks.training", "--memory-probe",
             "--preset", options.preset, "--placements", placement, "--precisions", precision,
             "--num-microbatches", str(options.num_microbatches),
             "--warmup", str(options.warmup), "--transformer-impl", options.transformer_impl]
    for flag, value in (("--seq-length", options.seq_length),
                        ("--micro-batch-size", options.micro_batch_size),
                        ("--recompute-granularity", options.recompute_granularity)):
        if value is not None:
            child += [flag, str(value)]
    # A world of its own: without torchrun's rendezvous (its address, and its agent store that
    # a child would wait on for ever) it picks a free port.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT") and not k.startswith("TORCHELASTIC_")}
    result = subprocess.run(child, capture_output=True, text=True,
                            env={**env, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    if result.returncode:
        raise RuntimeError(f"memory probe for {placement} ({precision}) failed:\n"
                           f"{result.stderr[-3000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


def memory_probe(options: BenchmarkOptions) -> int:
    """The child side of `_cpu_memory_probe`: build one model, run the warm-up steps."""
    from spannorm_megatron.metrics.memory import current_rss_bytes, peak_rss_bytes
    from spannorm_megatron.process import initialize

    initialize(seed=1234)
    before = current_rss_bytes()
    bench = bench_for(options.placements[0], options.precisions[0], options)
    for _ in range(max(options.warmup, 1)):
        bench.step()
    print(json.dumps({"peak_bytes": peak_rss_bytes() - before}))
    return 0


def run(options: BenchmarkOptions, on_row=None) -> List[Result]:
    """Every (precision, placement) row; `on_row(results so far)` after each one."""
    import torch

    from spannorm_megatron.metrics import device_peak_flops, flops_per_token, mfu
    from spannorm_megatron.placements import PLACEMENTS
    from spannorm_megatron.process import initialize

    from spannorm_megatron.errors import ConfigError
    from spannorm_megatron.model.specs import transformer_engine_available

    if "fp8" in options.precisions and not transformer_engine_available():
        raise ConfigError("--precisions fp8 needs Transformer Engine and a GPU, and this machine "
                          "lacks one of them: drop fp8 or install the 'te' extra on a GPU host.")
    placements = options.placements or sorted(PLACEMENTS)
    if "prenorm" not in placements:
        placements = ["prenorm", *placements]
    initialize(parallel_layout(options), seed=1234)
    world = torch.distributed.get_world_size()
    results: List[Result] = []
    for precision in options.precisions:
        # The peak MFU is quoted against: bf16's for FP8 runs too (see the module docstring).
        peak = device_peak_flops(torch.float32 if precision == "fp32" else torch.bfloat16)
        for placement in placements:
            start = _start_memory_measurement()
            bench = bench_for(placement, precision, options)
            for _ in range(options.warmup):
                bench.step()
            peak_memory = _memory_added_since(start)
            if peak_memory is None and world == 1 and not options.no_memory:
                peak_memory = _cpu_memory_probe(options, placement, precision)
            _log(f"built {placement} ({precision}, {bench.transformer_impl}), warm-up done")
            bench.step_times = [bench.step() for _ in range(options.rounds * options.iters)]
            seconds = statistics.median(bench.step_times)
            step_memory = (measure_step_memory(bench, options.rounds)
                           if options.log_step_memory else {})
            tokens = (bench.micro_batch * bench.seq_length * options.num_microbatches
                      * _data_parallel_size())
            fpt = flops_per_token(bench.model_config, bench.seq_length,
                                  recompute=options.recompute_granularity)
            results.append(Result(
                placement=placement, precision=precision, step_seconds=seconds,
                tokens_per_second=tokens / seconds,
                mfu=None if peak is None else mfu(tokens / seconds, fpt, peak, num_devices=world),
                peak_memory_bytes=peak_memory,
                step_seconds_samples=list(bench.step_times),
                transformer_impl=bench.transformer_impl,
                plain_step_memory_bytes=_median_int(step_memory.get("plain")),
                log_step_memory_bytes=_median_int(step_memory.get("log")),
                step_memory_samples=step_memory,
            ))
            bench.close()
            _log(f"measured {placement} ({precision}): {seconds * 1000:.1f} ms/step")
            _add_ratios(results)
            if on_row is not None:
                on_row(results)
    return results


def _median_int(values) -> Optional[int]:
    return int(statistics.median(values)) if values else None


def _data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def _add_ratios(results: List[Result]) -> None:
    baseline = {r.precision: r for r in results if r.placement == "prenorm"}
    for r in results:
        base = baseline.get(r.precision)
        if base is None:
            continue
        r.tokens_per_second_vs_prenorm = r.tokens_per_second / base.tokens_per_second
        if r.peak_memory_bytes and base.peak_memory_bytes:
            r.memory_vs_prenorm = r.peak_memory_bytes / base.peak_memory_bytes


def table(results: List[Result]) -> str:
    header = ("| precision | placement | step (ms) | tokens/s | vs PreNorm | MFU | peak memory "
              "| memory vs PreNorm |\n|---|---|---|---|---|---|---|---|")
    rows = [header]
    for r in results:
        memory = f"{r.peak_memory_bytes / 2**20:,.0f} MiB" if r.peak_memory_bytes else "n/a"
        rows.append(
            f"| {r.precision} | {r.placement} | {r.step_seconds * 1000:.1f} | "
            f"{r.tokens_per_second:,.0f} | {r.tokens_per_second_vs_prenorm:.3f} | "
            f"{'n/a' if r.mfu is None else f'{r.mfu * 100:.1f}%'} | {memory} | "
            f"{'n/a' if r.memory_vs_prenorm is None else f'{r.memory_vs_prenorm:.3f}'} |")
    measured = [r for r in results if r.log_step_memory_bytes is not None]
    if measured:
        rows += ["", "| precision | placement | plain step adds | logging step adds | "
                 "logging - plain |", "|---|---|---|---|---|"]
        for r in measured:
            plain, log = r.plain_step_memory_bytes, r.log_step_memory_bytes
            rows.append(f"| {r.precision} | {r.placement} | {plain / 2**20:,.1f} MiB | "
                        f"{log / 2**20:,.1f} MiB | {(log - plain) / 2**20:+,.1f} MiB |")
    return "\n".join(rows)


def _log(message: str) -> None:
    harness.log("benchmark", message)


def benchmark(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and measure; bad input raises a UserError."""
    options = parse_options(argv)
    if options.memory_probe:
        return memory_probe(options)
    results = run(options, on_row=lambda rows: harness.write_json(
        rows, options, mfu_reference=MFU_REFERENCE))
    harness.publish(table(results), results, options, mfu_reference=MFU_REFERENCE)
    return 0



def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
