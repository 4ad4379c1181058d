"""The GPU issue's targets, read off the benchmark JSON that tools/gpu/check.sh writes.

    python tools/gpu/targets.py OUT/bench.json

The file maps "FLAVOUR PRESET" (FLAVOUR: `local` for the local layers, `te` for Transformer
Engine's) to one `spannorm-benchmark --output` document (tools/gpu/check.sh writes it as each
row finishes, so it may hold part of a run); a row whose recorded `transformer_impl` differs from
the flavour asked for is reported as such. Targets:
  - SpanNorm tokens/s >= 0.98x PreNorm's, same preset and precision;
  - SpanNorm peak memory within 3% of PreNorm's;
  - 1.3b, bf16, sequence 2048: MFU >= 40% of the nominal 989 TFLOP/s with TE (local beside it);
    MFU here is recomputed as tokens/s x model FLOPs per token (spannorm_megatron.metrics) over
    989e12, whatever peak the benchmark itself divided by;
  - FP8 tokens/s >= 1.3x bf16's, same preset and placement.
And, for information, what a logging step adds to a plain step's memory where it was measured.
Prints one line per check (PASS / MISS / INFO with the numbers); exit status 0 either way.
"""

from __future__ import annotations

import json
import os
import sys

NOMINAL_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16, the reference


def flops_per_token(preset: str, seq_length: int, placement: str):
    """Model FLOPs per token of a benchmark preset, or None where the package is not at hand
    (check.sh puts the checkout on PYTHONPATH; elsewhere, install it: tools/setup_env.sh)."""
    try:
        from spannorm_megatron.benchmarks.training import PRESETS
        from spannorm_megatron.config.model import ModelConfig
        from spannorm_megatron.metrics import flops_per_token as fpt
    except Exception:  # noqa: BLE001 - a report, not a gate
        return None
    fields = PRESETS[preset][0]
    return fpt(ModelConfig.recommended(norm_placement=placement, max_sequence_length=seq_length, **fields),
               seq_length)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def check(paths) -> list:
    lines = []
    rows = {}  # (flavour, preset, precision, placement) -> result, plus seq per preset
    seqs = {}
    for path in paths:
        for key, doc in json.load(open(path)).items():
            flavour, preset = key.split(" ", 1)
            seqs[preset] = doc["args"]["seq_length"] or None
            for r in doc["results"]:
                rows[(flavour, preset, r["precision"], r["placement"])] = r
                ran = r.get("transformer_impl")
                wanted = "transformer_engine" if flavour == "te" else "local"
                if ran and ran != wanted:
                    lines.append(f"WRONG {flavour} {preset} {r['precision']} {r['placement']}: "
                                 f"ran with {ran}, not {wanted}")
    for (flavour, preset, precision, placement), r in sorted(rows.items()):
        if placement != "spannorm":
            continue
        ratio = r["tokens_per_second_vs_prenorm"]
        if ratio is None:
            continue
        lines.append(f"{verdict(ratio >= 0.98)} {flavour} {preset} {precision}: SpanNorm tokens/s "
                     f"{ratio:.3f}x PreNorm's (target >= 0.98)")
        memory = r.get("memory_vs_prenorm")
        if memory is not None:
            lines.append(f"{verdict(memory <= 1.03)} {flavour} {preset} {precision}: SpanNorm "
                         f"peak memory {memory:.3f}x PreNorm's (target <= 1.03)")
    for (flavour, preset, precision, placement), r in sorted(rows.items()):
        if precision != "bf16" or preset != "1.3b":
            continue
        fpt = flops_per_token(preset, seqs[preset] or 2048, placement)
        if fpt is None:
            continue
        mfu = r["tokens_per_second"] * fpt / NOMINAL_BF16_FLOPS
        target = "target >= 40% with TE" if flavour == "te" else "reported beside TE's"
        lines.append(f"{verdict(mfu >= 0.40) if flavour == 'te' else 'INFO'} {flavour} 1.3b bf16 "
                     f"seq {seqs[preset]} {placement}: MFU {100 * mfu:.1f}% of 989 TFLOP/s "
                     f"({r['tokens_per_second']:,.0f} tokens/s; {target})")
    for (flavour, preset, precision, placement), r in sorted(rows.items()):
        if precision != "fp8":
            continue
        base = rows.get((flavour, preset, "bf16", placement))
        if base:
            speedup = r["tokens_per_second"] / base["tokens_per_second"]
            lines.append(f"{verdict(speedup >= 1.3)} {flavour} {preset} {placement}: FP8 "
                         f"tokens/s {speedup:.2f}x bf16's (target >= 1.3)")
    for (flavour, preset, precision, placement), r in sorted(rows.items()):
        log, plain = r.get("log_step_memory_bytes"), r.get("plain_step_memory_bytes")
        if log is not None and plain is not None:
            lines.append(f"INFO {flavour} {preset} {precision} {placement}: a logging step adds "
                         f"{log / 2**20:,.1f} MiB, a plain step {plain / 2**20:,.1f} MiB "
                         f"(difference {(log - plain) / 2**20:+,.1f} MiB)")
    return lines


def main(argv=None) -> int:
    paths = [p for p in (argv if argv is not None else sys.argv[1:]) if os.path.exists(p)]
    lines = check(paths)
    print("targets (the GPU check's throughput, MFU and FP8 goals):")
    for line in lines or ["(no benchmark results)"]:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
