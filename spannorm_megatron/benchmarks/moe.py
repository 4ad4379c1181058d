"""`spannorm-benchmark-moe` (tools/benchmark_moe.py): training-step speed of expert-parallel MoE
variants against the dense model of the same active parameters, measured in one run.

    torchrun --nproc_per_node 2 tools/benchmark_moe.py                    # CPU: EP2, a few minutes
    torchrun --nproc_per_node 8 tools/benchmark_moe.py --hidden-size 2048 --num-experts 64 \\
        --moe-ffn-hidden-size 1408 --seq-length 4096 --precision bf16      # one GPU node, EP8

Variants (`--variants`, all SpanNorm, expert-parallel over the whole world unless
`--expert-model-parallel-size` says otherwise):

    dense                      the baseline: FFN hidden = top-k x the expert FFN hidden, so a token
                               meets the same MLP weights and FLOPs as in the MoE models
    alltoall, allgather        dropless MoE with that token dispatcher
    alltoall_capacity          --moe-expert-capacity-factor C: tokens over capacity are dropped
    alltoall_capacity_padded   the same, plus --moe-pad-expert-input-to-capacity (every expert
    allgather_capacity_padded  computes C x its even share of tokens, padding included)

Every variant is built once, warmed up, then timed in `--rounds` rounds of `--iters` steps, the
variants taking turns within a round (and a rotated order each round), so a machine whose speed
drifts moves all of them alike. Each result is the median of its timed steps; the spread is the
25th-75th percentile. The ratio to dense is paired: in every round, the dense model's median
step over the variant's, then the median (and range) of those per-round ratios, which a shared
machine's slow minutes cancel out of. tokens/s is over the whole world (micro-batch x sequence x
data-parallel size). Prints a table and writes JSON with every step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from spannorm_megatron.benchmarks import harness
from spannorm_megatron.benchmarks.harness import IMPLS, Bench
from spannorm_megatron.cli import run_cli
from spannorm_megatron.config.options import add_arguments, option, parse_sections

VARIANTS: Dict[str, dict] = {
    "dense": {},
    "alltoall": dict(moe_token_dispatcher_type="alltoall"),
    "allgather": dict(moe_token_dispatcher_type="allgather"),
    "alltoall_capacity": dict(moe_token_dispatcher_type="alltoall", capacity=True),
    "alltoall_capacity_padded": dict(moe_token_dispatcher_type="alltoall", capacity=True,
                                     moe_pad_expert_input_to_capacity=True),
    "allgather_capacity_padded": dict(moe_token_dispatcher_type="allgather", capacity=True,
                                      moe_pad_expert_input_to_capacity=True),
}


@dataclass
class Result:
    variant: str
    dispatcher: str
    capacity_factor: float
    padded: bool
    step_seconds: float
    step_seconds_p25: float
    step_seconds_p75: float
    tokens_per_second: float
    vs_dense: float = 0.0
    """Median over rounds of (dense step time / this variant's step time) within the round."""
    vs_dense_min: float = 0.0
    vs_dense_max: float = 0.0
    flops_per_token: float = 0.0
    parameters: int = 0
    """This rank's parameters (the experts are split over the EP ranks)."""
    step_seconds_samples: List[float] = field(default_factory=list)
    """Every timed step, round by round (`--iters` per round)."""


@dataclass
class MoEBenchmarkOptions:
    """The command line of `spannorm-benchmark-moe`."""

    variants: List[str] = option(doc="dense is always measured: it is the baseline.", nargs="+",
                                 choices=tuple(VARIANTS), default_factory=lambda: list(VARIANTS))
    num_layers: int = option(4, "Transformer layers.", at_least=1)
    hidden_size: int = option(256, "Hidden size.", at_least=1)
    num_attention_heads: int = option(4, "Attention heads.", at_least=1)
    num_experts: int = option(8, "Experts of the MoE variants.", at_least=1)
    moe_router_topk: int = option(2, "Experts per token.", at_least=1)
    moe_ffn_hidden_size: int = option(512, "FFN hidden size of one expert.", at_least=1)
    moe_expert_capacity_factor: float = option(1.0, "Capacity C of the *_capacity variants.",
                                                above=0.0)
    vocab_size: int = option(4096, "Vocabulary size.", at_least=1)
    seq_length: int = option(256, "Sequence length.", at_least=1)
    micro_batch_size: int = option(4, "Micro-batch size.", at_least=1)
    expert_model_parallel_size: Optional[int] = option(None, "Default: the world size.",
                                                        at_least=1)
    precision: str = option("fp32", "Training precision.", choices=("fp32", "bf16"))
    transformer_impl: str = option("auto", "Layers: auto (Transformer Engine where it runs), "
                                   "local or transformer_engine.", choices=IMPLS)
    warmup: int = option(3, "Untimed steps per variant.", at_least=0)
    iters: int = option(4, "Timed steps per variant per round.", at_least=1)
    rounds: int = option(5, "Rounds.", at_least=1)
    output: Optional[str] = option(None, "JSON file for the results.", path="output_file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, MoEBenchmarkOptions)
    return parser


def parse_options(argv=None) -> MoEBenchmarkOptions:
    (options,) = parse_sections(build_parser(), [MoEBenchmarkOptions], argv)
    return options


def model_fields(variant: str, options: MoEBenchmarkOptions) -> dict:
    """The ModelConfig fields of one variant."""
    fields = dict(num_layers=options.num_layers, hidden_size=options.hidden_size,
                  num_attention_heads=options.num_attention_heads,
                  vocab_size=options.vocab_size)
    if variant == "dense":
        return dict(fields,
                    ffn_hidden_size=options.moe_router_topk * options.moe_ffn_hidden_size)
    overrides = dict(VARIANTS[variant])
    if overrides.pop("capacity", False):
        overrides["moe_expert_capacity_factor"] = options.moe_expert_capacity_factor
    return dict(fields, ffn_hidden_size=options.moe_ffn_hidden_size,
                num_experts=options.num_experts, moe_router_topk=options.moe_router_topk,
                moe_aux_loss_coeff=1e-2, moe_ffn_hidden_size=options.moe_ffn_hidden_size,
                **overrides)


def layouts(options: MoEBenchmarkOptions):
    """(the MoE variants' layout, the dense baseline's): the same world, data-parallel over all of
    it; expert-parallel for the MoE models only (megatron-core refuses EP without experts)."""
    from spannorm_megatron.config.parallel import ParallelConfig

    ep = options.expert_model_parallel_size or int(os.environ.get("WORLD_SIZE", "1"))
    return ParallelConfig(expert_model_parallel_size=ep), ParallelConfig()


def run(options: MoEBenchmarkOptions) -> List[Result]:
    from megatron.core import parallel_state

    from spannorm_megatron.config.performance import PerformanceConfig
    from spannorm_megatron.metrics import flops_per_token
    from spannorm_megatron.process import initialize

    moe_layout, dense_layout = layouts(options)
    initialize(moe_layout, seed=1234)
    performance = PerformanceConfig(bf16=options.precision == "bf16")
    variants = ["dense", *[v for v in options.variants if v != "dense"]]
    benches = {}
    for variant in variants:
        model = harness.benchmark_model("spannorm", model_fields(variant, options),
                                        options.seq_length, options.transformer_impl)
        bench = Bench(model, dense_layout if variant == "dense" else moe_layout, performance,
                      seq_length=options.seq_length, micro_batch=options.micro_batch_size)
        for _ in range(options.warmup):
            bench.step()
        benches[variant] = bench
        _log(f"built {variant} ({bench.transformer_impl}), warm-up done")
    for round_index in range(options.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            benches[variant].step_times += [benches[variant].step()
                                             for _ in range(options.iters)]
        _log(f"round {round_index + 1}/{options.rounds} done")
    tokens = (options.micro_batch_size * options.seq_length
              * parallel_state.get_data_parallel_world_size())
    results = []
    for variant in variants:
        bench = benches[variant]
        times = sorted(bench.step_times)
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        seconds = statistics.median(times)
        config = bench.model_config
        results.append(Result(
            variant=variant,
            dispatcher="-" if variant == "dense" else config.moe_token_dispatcher_type,
            capacity_factor=config.moe_expert_capacity_factor or 0.0,
            padded=bool(config.moe_pad_expert_input_to_capacity),
            step_seconds=seconds, step_seconds_p25=q1, step_seconds_p75=q3,
            tokens_per_second=tokens / seconds,
            flops_per_token=flops_per_token(config, options.seq_length),
            parameters=sum(p.numel() for chunk in bench.model for p in chunk.parameters()),
            step_seconds_samples=list(bench.step_times)))
    _add_paired_ratios(results, options.iters)
    return results


def _add_paired_ratios(results: List[Result], iters: int) -> None:
    def round_medians(r: Result) -> List[float]:
        s = r.step_seconds_samples
        return [statistics.median(s[i:i + iters]) for i in range(0, len(s), iters)]

    dense = round_medians(results[0])
    for r in results:
        ratios = [d / v for d, v in zip(dense, round_medians(r))]
        r.vs_dense = statistics.median(ratios)
        r.vs_dense_min, r.vs_dense_max = min(ratios), max(ratios)


def table(results: List[Result]) -> str:
    rows = ["| variant | dispatcher | capacity | step (ms), median [p25-p75] | tokens/s | "
            "vs dense, median [range] over rounds | GFLOPs/token | parameters (rank 0) |",
            "|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        capacity = "-" if not r.capacity_factor else \
            f"{r.capacity_factor:g}{', padded' if r.padded else ', drop'}"
        rows.append(
            f"| {r.variant} | {r.dispatcher} | {capacity} | {r.step_seconds * 1e3:.1f} "
            f"[{r.step_seconds_p25 * 1e3:.1f}-{r.step_seconds_p75 * 1e3:.1f}] | "
            f"{r.tokens_per_second:,.0f} | "
            f"{r.vs_dense:.3f} [{r.vs_dense_min:.3f}-{r.vs_dense_max:.3f}] | "
            f"{r.flops_per_token / 1e9:.4f} | {r.parameters:,} |")
    return "\n".join(rows)


def _log(message: str) -> None:
    harness.log("benchmark_moe", message)


def benchmark(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and measure; bad input raises a UserError."""
    options = parse_options(argv)  # --help and a mistyped flag are answered before torch loads
    import torch

    results = run(options)
    harness.publish(table(results), results, options,
                    world_size=torch.distributed.get_world_size())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
