"""The grid's results table: reading and appending rows, the derived columns, the CSV, the
Markdown summaries and the export into docs/ (one compressed table, overwritten in place)."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
from typing import Dict, List, Sequence, Union

from spannorm_megatron.lab.compressed import write_compressed
from spannorm_megatron.lab.grid.signals import signals_or_error
from spannorm_megatron.lab.rules import collapse_threshold


ROW_COLUMNS = (
    "index", "name", "group", "cell", "placement", "depth", "seed", "corpus", "tokenizer",
    "vocab_size", "padded_vocab_size", "scale_mode", "scale_init", "lr", "warmup", "tokens_per_step", "train_iters",
    "width", "embeddings", "status", "exit_code", "start_loss", "final_train_loss",
    "min_train_loss", "final_valid_loss", "valid_bits_per_byte", "heldout_bits_per_byte",
    "heldout_loss", "diverged",
    "layer_grad_ratio_min", "layer_grad_ratio_final", "max_grad_norm", "final_grad_norm",
    "proj_rms_attn_first_saved", "proj_rms_attn_final", "proj_rms_fc2_first_saved",
    "proj_rms_fc2_final", "init_method_std", "proj_init_std", "forward_multiplier", "seconds", "estimated_seconds", "median_step_ms",
    "finished_at",
)



def read_results(path: str) -> List[dict]:
    """The rows of a results table: a grid's own results.jsonl, or an export's results.jsonl.gz."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: that run reruns
                continue
    return rows


def _clean(value):
    """JSON-safe, floats to 6 significant digits (NaN -> null, inf -> "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def append_result(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(_clean(row)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def latest_rows(rows: List[dict]) -> Dict[str, dict]:
    latest = {}
    for row in rows:
        latest[row["name"]] = row
    return latest


def branch_factor(placement: str, depth: int, scale_init: str) -> float:
    """Scale Init's factor c (spannorm_megatron.model.scale_init.branch_scale_factor): output
    projections drawn with c * sigma (scale_mode init) or branch outputs multiplied by c
    (forward)."""
    from spannorm_megatron.config.model import ModelConfig
    from spannorm_megatron.model.scale_init import branch_scale_factor

    return branch_scale_factor(ModelConfig.recommended(
        norm_placement=placement, num_layers=depth,
        scale_init=None if scale_init == "default" else scale_init))


def with_derived(row: dict) -> dict:
    """The row plus `proj_init_std` (the std the output projections were drawn with) and
    `forward_multiplier` (what multiplies the branch outputs in the forward pass: 1 under
    scale_mode init), so weight RMS compares across scale modes as RMS x multiplier."""
    row = dict(row)
    try:
        c = branch_factor(row["placement"], int(row["depth"]), str(row.get("scale_init")))
    except (KeyError, ValueError, TypeError):
        return row
    sigma = float(row.get("init_method_std") or 0.02)
    forward = row.get("scale_mode") == "forward"
    row.setdefault("proj_init_std", sigma if forward else sigma * c)
    row.setdefault("forward_multiplier", c if forward else 1.0)
    return row


def write_csv(path: str, rows: List[dict]) -> None:
    from spannorm_megatron.lab.results import fmt

    ordered = sorted((with_derived(r) for r in latest_rows(rows).values()),
                     key=lambda r: (r.get("index", 0), r["name"]))
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ROW_COLUMNS)
        for row in ordered:
            writer.writerow([fmt(row.get(c), 6) for c in ROW_COLUMNS])
    os.replace(tmp, path)


def summarize_by_setting(rows: List[dict]) -> str:
    """Markdown: one line per setting (cell x depth x placement) over every seed that ran it, in
    whichever group (a cell's seed 1234 in `factors` and its seeds 1235/1236 in `confirm` are one
    setting): n, validation loss mean / sd / min / max, collapses (runs whose layer-2/L gradient
    ratio fell below the collapse alarm's threshold) and held-out bits per byte."""
    from statistics import mean, pstdev

    threshold = collapse_threshold()  # as a training run would warn about them
    settings: Dict[tuple, List[dict]] = {}
    for row in sorted(latest_rows(rows).values(), key=lambda r: (r["cell"], r["depth"],
                                                                  r.get("index", 0))):
        if row.get("status") == "ok":
            settings.setdefault((row["cell"], row["depth"], row["placement"]), []).append(row)
    lines = [f"| cell | L | placement | n | seeds | valid loss mean | sd | min | max | "
             f"collapsed (ratio < {threshold:g}) | held-out bits/byte mean (n) |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (cell, depth, placement), rs in settings.items():
        losses = [r["final_valid_loss"] for r in rs if isinstance(r.get("final_valid_loss"), float)]
        ratios = [r["layer_grad_ratio_min"] for r in rs
                  if isinstance(r.get("layer_grad_ratio_min"), float)]
        held = [r["heldout_bits_per_byte"] for r in rs
                if isinstance(r.get("heldout_bits_per_byte"), float)]
        seeds = ",".join(str(s) for s in sorted({r["seed"] for r in rs}))
        lines.append(
            f"| {cell} | {depth} | {placement} | {len(rs)} | {seeds} | "
            + (f"{mean(losses):.4g} | " if losses else "| ")
            + (f"{pstdev(losses):.2g} | " if len(losses) > 1 else "| ")
            + (f"{min(losses):.4g} | {max(losses):.4g} | " if losses else "| | ")
            + f"{sum(r < threshold for r in ratios)} of {len(ratios)} | "
            + (f"{mean(held):.4g} ({len(held)}) |" if held else "|"))
    return "\n".join(lines) + "\n"


def summarize(rows: List[dict]) -> str:
    """Markdown: final validation loss (mean +- spread over seeds, n) per group x cell x depth x
    placement."""
    from statistics import mean, median, pstdev

    cells: Dict[tuple, List[dict]] = {}
    for row in sorted(latest_rows(rows).values(), key=lambda r: r.get("index", 0)):
        cells.setdefault((row["group"], row["cell"], row["depth"], row["placement"]), []).append(row)
    lines = ["| group | cell | L | placement | n | valid loss mean | spread (sd) | min | max | "
             "bits/byte | held-out bits/byte (n) | min layer-2/L grad ratio (median) | proj RMS / "
             "init std, first save -> end (attn, mean) | status |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for (group, cell, depth, placement), rs in cells.items():
        losses = [r["final_valid_loss"] for r in rs if isinstance(r.get("final_valid_loss"), float)]
        bits = [r["valid_bits_per_byte"] for r in rs if isinstance(r.get("valid_bits_per_byte"), float)]
        held = [r["heldout_bits_per_byte"] for r in rs
                if isinstance(r.get("heldout_bits_per_byte"), float)]
        ratios = sorted(r["layer_grad_ratio_min"] for r in rs
                        if isinstance(r.get("layer_grad_ratio_min"), float))
        statuses = ",".join(sorted({r["status"] for r in rs}))
        growth = []
        for r in map(with_derived, rs):
            init = r.get("proj_init_std")
            first, last = r.get("proj_rms_attn_first_saved"), r.get("proj_rms_attn_final")
            if isinstance(init, float) and isinstance(first, float) and isinstance(last, float):
                growth.append((first / init, last / init))
        rms_text = (f"{mean(g[0] for g in growth):.2g} -> {mean(g[1] for g in growth):.2g}"
                    if growth else "")

        def f(x, d=4):
            return "" if x is None else f"{x:.{d}g}"
        lines.append(
            f"| {group} | {cell} | {depth} | {placement} | {len(rs)} | "
            f"{f(mean(losses)) if losses else ''} | {f(pstdev(losses), 2) if len(losses) > 1 else ''} | "
            f"{f(min(losses)) if losses else ''} | {f(max(losses)) if losses else ''} | "
            f"{f(mean(bits)) if bits else ''} | "
            f"{f'{mean(held):.4g} ({len(held)})' if held else ''} | "
            f"{f(median(ratios), 2) if ratios else ''} | "
            f"{rms_text} | {statuses} |")
    return "\n".join(lines) + "\n"



EXPORTED_RESULTS = "results.jsonl.gz"


def write_table(path: str, rows: Sequence[dict]) -> None:
    """The rows as gzip-compressed JSON lines, in place of `path` (`lab.compressed`: the same
    rows give the same bytes)."""
    write_compressed(path, "".join(json.dumps(_clean(row)) + "\n" for row in rows))


def export_results(out_dirs: Union[str, Sequence[str]], target: str) -> List[str]:
    """The tables of one or several grid output directories (workers that ran different
    groups), merged, into `target`: the one compressed table (results.jsonl.gz, every row with
    its histories; the CSV columns are its scalar fields), summary.md and the figures. Files
    of an earlier export there are overwritten."""
    out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
    rows, where = [], {}
    for out_dir in out_dirs:
        for row in read_results(os.path.join(out_dir, "results.jsonl")):
            rows.append(row)
            where[row["name"]] = out_dir
    os.makedirs(target, exist_ok=True)
    latest = sorted(latest_rows(rows).values(), key=lambda r: r.get("index", 0))
    table = []
    for row in latest:
        if "signals" not in row:  # rows from before the signals were kept: read them now
            row = dict(row, signals=signals_or_error(os.path.join(
                where[row["name"]], "runs", row["name"], "tensorboard"), int(row["depth"])))
        table.append(with_derived(row))
    # Compressed: with every run's signal histories the table is megabytes of text.
    write_table(os.path.join(target, EXPORTED_RESULTS), table)
    with open(os.path.join(target, "summary.md"), "w") as f:
        f.write("# Every setting, pooled over the groups that ran it\n\n"
                + summarize_by_setting(rows) + "\n# Per group\n\n" + summarize(rows))
    from spannorm_megatron.lab.grid_plots import plot_grid

    figures = plot_grid([with_derived(r) for r in latest], target)
    return [os.path.join(target, n) for n in (EXPORTED_RESULTS, "summary.md")] + figures
