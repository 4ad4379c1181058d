"""The "Rollback" table of docs/stability.md: four arms on the 128-layer grid's collapsing cells,
from the factor grid's rows (no policy, 30% warm-up, spannorm_clean where they ran) and the rows
of examples/depth_sweep/rollback.yaml (the rest).

    python examples/depth_sweep/rollback_table.py \
        --grid docs/stability/grid/results.jsonl.gz \
        --rollback docs/stability/rollback/results.jsonl.gz     # or a running runs/rollback/results.jsonl
    python examples/depth_sweep/rollback_table.py --rollback runs/rollback/results.jsonl \
        --write-rows docs/stability/rollback/results.jsonl.gz   # the rows, compressed, for the docs

A run *trains* when it ended normally, its last course (after its last rollback, if any) never
took the layer-2/L gradient ratio below the collapse alarm's 1e-3, and its final validation loss
left the floor: below 6.0 (in these cells every collapsed grid run ended at 6.22-6.36, every
other SpanNorm run at 5.37-5.87; a run can keep its ratio above 1e-3 and still not learn, as the
factor grid's PostNorm at lr 5e-4 did). *Extra iterations* are those a rollback trained twice
(from the rollback point to the alarm).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional

from spannorm_megatron.lab.grid import read_results

THRESHOLD = 1e-3
FLOOR = 6.0
SEEDS = (1234, 1235, 1236)
# cell label -> (placement, no-policy cell slug, seeds)
CELLS = {
    "SpanNorm, base": ("spannorm", "base", SEEDS),
    "PostNorm, base": ("postnorm", "base", SEEDS),
    "SpanNorm, lr 4e-3": ("spannorm", "lr-0.004", (1234,)),
    "SpanNorm, warm-up 5": ("spannorm", "warmup-5", (1234,)),
}


def arm_names(arm: str, placement: str, cell: str, seed: int) -> str:
    """The row name of `arm` for a cell and seed."""
    prefix = f"{placement}_L128_s{seed}"
    if arm == "no policy":
        return f"{prefix}_{cell}"
    if arm == "rollback (defaults)":
        return f"{prefix}_on-collapse-rollback" if cell == "base" else \
            f"{prefix}_{cell}_on-collapse-rollback"
    if arm == "30% warm-up from the start":
        # warm-up 60 of 200 steps replaces the cell's own warm-up (warm-up 5 -> 60)
        return f"{prefix}_warmup-60" if cell in ("base", "warmup-5") else f"{prefix}_{cell}_warmup-60"
    if arm == "spannorm_clean":
        return f"spannorm_clean_L128_s{seed}_{cell}"
    raise ValueError(arm)


ARMS = ("no policy", "rollback (defaults)", "30% warm-up from the start", "spannorm_clean")


def last_course_min_ratio(row: dict) -> Optional[float]:
    """Minimum layer-2/L ratio over the logged steps of the run's last course (TensorBoard keeps
    every course; a rollback shows as the step count going back)."""
    signals = row.get("signals") or {}
    steps, early, last = (signals.get(k) or [] for k in ("iterations", "2/grad_norm",
                                                        "L/grad_norm"))
    start = 0
    for i in range(1, len(steps)):
        if steps[i] <= steps[i - 1]:
            start = i
    ratios = [a / b for a, b in list(zip(early, last))[start:] if b and math.isfinite(a / b)]
    if ratios:
        return min(ratios)
    return row.get("layer_grad_ratio_min")


def trains(row: dict) -> bool:
    ratio, valid = last_course_min_ratio(row), row.get("final_valid_loss")
    return (row.get("exit_code") == 0 and ratio is not None and ratio >= THRESHOLD
            and valid is not None and valid < FLOOR)


def spread(values: List[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(rows: Dict[str, dict]) -> str:
    lines = ["| cell | arm | n | runs that train | extra iterations | final validation loss "
             "| held-out WikiText-2 bpb (n) |", "|---|---|---:|---:|---:|---|---|"]
    for label, (placement, cell, seeds) in CELLS.items():
        for arm in ARMS:
            found = [rows[name] for name in (arm_names(arm, placement, cell, seed)
                                             for seed in seeds) if name in rows]
            if not found:
                lines.append(f"| {label} | {arm} | 0 | - | - | not run | - |")
                continue
            extra = [int(r.get("extra_iterations") or 0) for r in found]
            valid = [r["final_valid_loss"] for r in found
                     if r.get("final_valid_loss") is not None]
            heldout = [r["heldout_bits_per_byte"] for r in found
                       if r.get("heldout_bits_per_byte") is not None]
            lines.append(
                f"| {label} | {arm} | {len(found)} | {sum(trains(r) for r in found)}/"
                f"{len(found)} | {spread(extra, 0) if arm.startswith('rollback') else '0'} | "
                f"{spread(valid)} | {spread(heldout)} ({len(heldout)}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="docs/stability/grid/results.jsonl.gz")
    parser.add_argument("--rollback", nargs="+", default=["docs/stability/rollback/results.jsonl.gz"])
    parser.add_argument("--write-rows", default=None,
                        help="write the --rollback rows (the latest of each run) here, gzipped "
                             "(the same rows give the same bytes), and exit")
    args = parser.parse_args(argv)
    if args.write_rows:
        latest = {}
        for path in args.rollback:
            latest.update({row["name"]: row for row in read_results(path)})
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in
                       sorted(latest.values(), key=lambda r: (r.get("index", 0), r["name"])))
        os.makedirs(os.path.dirname(os.path.abspath(args.write_rows)), exist_ok=True)
        with open(args.write_rows, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                              mtime=0) as f:
            f.write(text.encode())
        return 0
    rows = {row["name"]: row for row in read_results(args.grid)}
    for path in args.rollback:
        rows.update({row["name"]: row for row in read_results(path)})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
