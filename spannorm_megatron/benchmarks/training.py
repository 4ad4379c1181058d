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
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from spannorm_megatron.cli import run_cli
from spannorm_megatron.config.options import add_arguments, option
from spannorm_megatron.config.performance import FP8_FORMATS, FP8_RECIPES, RECOMPUTE_GRANULARITIES

PRECISIONS = ("fp32", "bf16", "fp8")
IMPLS = ("auto", "local", "transformer_engine")
"""--transformer-impl of the benchmarks (auto: Transformer Engine where it runs)."""
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
    seq_length: Optional[int] = option(None, "Default: the preset's.")
    micro_batch_size: Optional[int] = option(None, "Default: the preset's.")
    num_microbatches: int = option(1, "Micro-batches per step.")
    warmup: int = option(3, "Untimed steps per model.")
    iters: int = option(5, "Timed steps per round.")
    rounds: int = option(3, "Timed steps per model: --rounds x --iters.")
    tensor_model_parallel_size: int = option(1, "Tensor-parallel ranks.")
    pipeline_model_parallel_size: int = option(1, "Pipeline stages.")
    expert_model_parallel_size: int = option(1, "Expert-parallel ranks.")
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
    output: Optional[str] = option(None, "JSON file for the results.", path="output_file")
    memory_probe: bool = option(False, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, BenchmarkOptions)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def parallel_layout(args):
    from spannorm_megatron.config.parallel import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                          pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                          expert_model_parallel_size=args.expert_model_parallel_size,
                          sequence_parallel=args.sequence_parallel,
                          use_distributed_optimizer=args.use_distributed_optimizer)


def performance_for(precision: str, args):
    """The run's `PerformanceConfig` at one precision of --precisions."""
    from spannorm_megatron.config.performance import PerformanceConfig

    return PerformanceConfig(
        bf16=precision != "fp32",
        fp8_format=args.fp8_format if precision == "fp8" else None,
        fp8_recipe=args.fp8_recipe,
        recompute_granularity=args.recompute_granularity,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
    )


class Bench:
    """One (placement, precision) model, optimizer and batch, alive until `close`.

    `parallel` is the model's layout when it is not the command line's (the MoE benchmark's dense
    baseline runs without expert parallelism in an expert-parallel world)."""

    def __init__(self, placement: str, precision: str, args, model_fields: dict,
                 seq_length: int, micro_batch: int, parallel=None):
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from spannorm_megatron.config.model import ModelConfig
        from spannorm_megatron.runtime import current_device
        from spannorm_megatron.training.setup import setup_model_and_optimizer

        self.placement, self.precision = placement, precision
        self.model_config = ModelConfig.recommended(norm_placement=placement, max_sequence_length=seq_length,
                                        transformer_impl=args.transformer_impl, **model_fields)
        performance = performance_for(precision, args)
        parallel = parallel or parallel_layout(args)
        performance.check_layout(parallel)
        performance.check_machine(self.model_config)
        self.model, self.optimizer = setup_model_and_optimizer(
            self.model_config, parallel, OptimizerConfig(optimizer="adam", lr=1e-4), performance)
        self.transformer_impl = self.model[0].config.transformer_impl
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=1e-4, max_lr=1e-4, min_lr=1e-4, lr_warmup_steps=0,
            lr_decay_steps=1, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
            wd_incr_steps=1, wd_incr_style="constant")
        generator = torch.Generator().manual_seed(0)
        device = current_device()
        tokens = torch.randint(0, self.model_config.vocab_size, (micro_batch, seq_length + 1),
                               generator=generator)
        self.batch = {
            "tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(micro_batch, seq_length, device=device),
            "position_ids": torch.arange(seq_length, device=device).expand(micro_batch, -1),
        }
        self.seq_length, self.micro_batch = seq_length, micro_batch
        self.num_microbatches = args.num_microbatches
        self.step_times: List[float] = []
        self.peak_memory: Optional[int] = None

    def close(self) -> None:
        """Drop the model, optimizer and batch. The model config's hooks (grad scaling, no-sync,
        finalize) point back at them, so only a collection frees the cycle; then the allocator
        hands the memory back before the next model is built."""
        self.model = self.optimizer = self.scheduler = self.batch = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def step(self) -> float:
        from spannorm_megatron.training.loop import train_step

        batches = iter([self.batch] * self.num_microbatches)
        _synchronize()
        start = time.perf_counter()
        train_step(self.model, self.optimizer, self.scheduler, batches,
                   num_microbatches=self.num_microbatches, seq_length=self.seq_length,
                   micro_batch_size=self.micro_batch, global_batch_size=self.micro_batch)
        _synchronize()
        return time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _start_memory_measurement() -> Optional[int]:
    """Memory allocated now, with the peak counter reset to it (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def _memory_added_since(start: Optional[int]) -> Optional[int]:
    if start is None:
        return None
    return int(torch.cuda.max_memory_allocated()) - start


def _cpu_memory_probe(args, placement: str, precision: str) -> Optional[int]:
    """Peak resident memory one model adds, measured in a fresh process (see the docstring)."""
    child = [sys.executable, "-m", "spannorm_megatron.benchmarks.training", "--memory-probe",
             "--preset", args.preset, "--placements", placement, "--precisions", precision,
             "--num-microbatches", str(args.num_microbatches), "--warmup", str(args.warmup),
             "--transformer-impl", args.transformer_impl]
    for flag, value in (("--seq-length", args.seq_length),
                        ("--micro-batch-size", args.micro_batch_size),
                        ("--recompute-granularity", args.recompute_granularity)):
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


def memory_probe(args) -> int:
    """The child side of `_cpu_memory_probe`: build one model, run the warm-up steps."""
    from spannorm_megatron.metrics.memory import current_rss_bytes, peak_rss_bytes
    from spannorm_megatron.process import initialize

    model_fields, default_seq, default_micro = PRESETS[args.preset]
    initialize(seed=1234)
    before = current_rss_bytes()
    bench = Bench(args.placements[0], args.precisions[0], args, model_fields,
                  args.seq_length or default_seq, args.micro_batch_size or default_micro)
    for _ in range(max(args.warmup, 1)):
        bench.step()
    print(json.dumps({"peak_bytes": peak_rss_bytes() - before}))
    return 0


def run(args) -> List[Result]:
    from spannorm_megatron.metrics import device_peak_flops, flops_per_token, mfu
    from spannorm_megatron.placements import PLACEMENTS
    from spannorm_megatron.process import initialize

    from spannorm_megatron.errors import ConfigError
    from spannorm_megatron.model.specs import transformer_engine_available

    if "fp8" in args.precisions and not transformer_engine_available():
        raise ConfigError("--precisions fp8 needs Transformer Engine and a GPU, and this machine "
                          "lacks one of them: drop fp8 or install the 'te' extra on a GPU host.")
    model_fields, default_seq, default_micro = PRESETS[args.preset]
    seq_length = args.seq_length or default_seq
    micro_batch = args.micro_batch_size or default_micro
    placements = args.placements or sorted(PLACEMENTS)
    if "prenorm" not in placements:
        placements = ["prenorm", *placements]
    initialize(parallel_layout(args), seed=1234)
    world = torch.distributed.get_world_size()
    results: List[Result] = []
    for precision in args.precisions:
        # The peak MFU is quoted against: bf16's for FP8 runs too (see the module docstring).
        peak = device_peak_flops(torch.float32 if precision == "fp32" else torch.bfloat16)
        for placement in placements:
            start = _start_memory_measurement()
            bench = Bench(placement, precision, args, model_fields, seq_length, micro_batch)
            for _ in range(args.warmup):
                bench.step()
            peak_memory = _memory_added_since(start)
            if peak_memory is None and world == 1 and not args.no_memory:
                peak_memory = _cpu_memory_probe(args, placement, precision)
            _log(f"built {placement} ({precision}, {bench.transformer_impl}), warm-up done")
            bench.step_times = [bench.step() for _ in range(args.rounds * args.iters)]
            seconds = statistics.median(bench.step_times)
            tokens = micro_batch * seq_length * args.num_microbatches * _data_parallel_size()
            fpt = flops_per_token(bench.model_config, seq_length,
                                  recompute=args.recompute_granularity)
            results.append(Result(
                placement=placement, precision=precision, step_seconds=seconds,
                tokens_per_second=tokens / seconds,
                mfu=None if peak is None else mfu(tokens / seconds, fpt, peak, num_devices=world),
                peak_memory_bytes=peak_memory,
                step_seconds_samples=list(bench.step_times),
                transformer_impl=bench.transformer_impl,
            ))
            bench.close()
            _log(f"measured {placement} ({precision}): {seconds * 1000:.1f} ms/step")
    _add_ratios(results)
    return results


def _data_parallel_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def _add_ratios(results: List[Result]) -> None:
    baseline = {r.precision: r for r in results if r.placement == "prenorm"}
    for r in results:
        base = baseline[r.precision]
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
    return "\n".join(rows)


def _log(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def environment() -> dict:
    import megatron.core

    info = {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import transformer_engine

        info["transformer_engine"] = transformer_engine.__version__
    except ImportError:
        info["transformer_engine"] = None
    return info


def benchmark(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and measure; bad input raises a UserError."""
    args = parse_args(argv)
    if args.memory_probe:
        return memory_probe(args)
    results = run(args)
    if torch.distributed.get_rank() == 0:
        print(table(results))
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump({"args": vars(args), "environment": environment(),
                           "mfu_reference": "dense bf16 peak of the device for bf16 and fp8 "
                                            "runs, fp32 peak for fp32 runs",
                           "results": [asdict(r) for r in results]}, f, indent=2)
            print(f"wrote {args.output}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
