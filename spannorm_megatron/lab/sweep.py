"""The depth sweep's report: one row per training run (placement x depth [x scale_init]) with
final losses, divergence, first loss spike and gradient norms, as Markdown, CSV, JSON and a PNG
of the loss and gradient-norm curves.

Layout the sweep script (`examples/depth_sweep/run.sh`) writes, one directory per run:

    SWEEP_DIR/sweep.txt                    key=value: settings and total wall time of the sweep
    SWEEP_DIR/runs/<name>/run.txt          key=value: placement, depth, scale_init, nproc,
                                           exit_code, seconds (wall time of the run)
    SWEEP_DIR/runs/<name>/train.log        spannorm-train's output
    SWEEP_DIR/runs/<name>/tensorboard/     its TensorBoard events (read when the log has no
                                           training lines)

Verdict definitions (diverged, loss spike, ...) are those of `spannorm_megatron.lab.training_log`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from spannorm_megatron.lab.compressed import write_compressed
from spannorm_megatron.lab.results import fmt
from spannorm_megatron.lab.rules import spike_factor, spike_window
from spannorm_megatron.lab.training_log import (
    RunHistory,
    RunVerdict,
    judge,
    parse_log,
    read_layer_grad_ratio,
    read_tensorboard,
)
from spannorm_megatron.config.options import (
    add_arguments,
    from_namespace,
    option,
    parse_options,
    path_type,
)
from spannorm_megatron.training.spikes import WARMUP

REPORT_COLUMNS = (
    "placement", "depth", "scale_init", "status", "start_loss", "final_train_loss",
    "final_valid_loss", "diverged", "first_spike_iteration", "num_spikes", "max_grad_norm",
    "final_grad_norm", "layer_grad_ratio_final", "layer_grad_ratio_min", "last_iteration",
    "median_step_ms", "seconds",
)


def read_key_values(path: str) -> Dict[str, str]:
    """`key=value` lines (blank lines and # comments ignored)."""
    values = {}
    if not os.path.isfile(path):
        return values
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _float(value: Optional[str]) -> Optional[float]:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


@dataclass
class SweepRun:
    name: str
    placement: str
    depth: int
    scale_init: str
    exit_code: Optional[int]
    seconds: Optional[float]
    history: RunHistory
    verdict: RunVerdict
    source: str
    """Where the history came from: 'log' or 'tensorboard' (or 'none')."""
    ratio_iterations: List[int] = field(default_factory=list)
    layer_grad_ratio: List[float] = field(default_factory=list)
    """Parameter-gradient norm of layer 2 / of the last layer on each logging step (from the
    run's TensorBoard stability tags; empty without them)."""

    @property
    def ratio_final(self) -> Optional[float]:
        return self.layer_grad_ratio[-1] if self.layer_grad_ratio else None

    @property
    def ratio_min(self) -> Optional[float]:
        finite = [r for r in self.layer_grad_ratio if math.isfinite(r)]
        return min(finite) if finite else None

    @property
    def status(self) -> str:
        if self.exit_code is None and not self.history.iterations:
            return "not run"
        if self.exit_code is None:
            return "incomplete"  # no run.txt: still running, or the sweep was stopped
        if self.exit_code != 0:
            return f"failed (exit {self.exit_code})"
        if not self.verdict.completed:
            return "incomplete"
        return "diverged" if self.verdict.diverged else "ok"

    def row(self) -> dict:
        v = self.verdict
        return {
            "placement": self.placement, "depth": self.depth, "scale_init": self.scale_init,
            "status": self.status, "start_loss": v.start_loss,
            "final_train_loss": v.final_train_loss, "final_valid_loss": v.final_valid_loss,
            "diverged": v.diverged, "first_spike_iteration": v.first_spike_iteration,
            "num_spikes": v.num_spikes, "max_grad_norm": v.max_grad_norm,
            "final_grad_norm": v.final_grad_norm, "layer_grad_ratio_final": self.ratio_final,
            "layer_grad_ratio_min": self.ratio_min, "last_iteration": v.last_iteration,
            "median_step_ms": v.median_step_ms, "seconds": self.seconds,
        }


_RUN_NAME = re.compile(r"^(?P<placement>.+?)_L(?P<depth>\d+)(?:_(?P<scale_init>.+))?$")


def load_run(run_dir: str) -> SweepRun:
    """One run directory (see the module docstring) -> history and verdict. A run that has no
    run.txt yet (still training, or killed) is named by its directory:
    <placement>_L<depth>[_<scale_init>]."""
    name = os.path.basename(os.path.normpath(run_dir))
    meta = {}
    match = _RUN_NAME.match(name)
    if match:
        meta = {k: v for k, v in match.groupdict().items() if v is not None}
    meta.update(read_key_values(os.path.join(run_dir, "run.txt")))
    log_path = os.path.join(run_dir, "train.log")
    history, source = RunHistory(), "none"
    if os.path.isfile(log_path):
        history, source = parse_log(log_path), "log"
    tb_dir = os.path.join(run_dir, "tensorboard")
    if not history.iterations and os.path.isdir(tb_dir):
        history, source = read_tensorboard(tb_dir), "tensorboard"
    exit_code = _int(meta.get("exit_code"))
    train_iters = _int(meta.get("train_iters"))
    depth = _int(meta.get("depth")) or 0
    ratio_iterations, ratios = read_layer_grad_ratio(tb_dir, depth)
    return SweepRun(
        name=name,
        placement=meta.get("placement", name),
        depth=depth,
        scale_init=meta.get("scale_init", "default"),
        exit_code=exit_code,
        seconds=_float(meta.get("seconds")),
        history=history,
        verdict=judge(history, exit_code=exit_code, train_iters=train_iters),
        source=source,
        ratio_iterations=ratio_iterations,
        layer_grad_ratio=ratios,
    )


def load_sweep(sweep_dir: str) -> List[SweepRun]:
    """Every run under SWEEP_DIR/runs, by depth, then in the sweep's placement order."""
    runs_dir = os.path.join(sweep_dir, "runs")
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"{sweep_dir} has no runs/ directory: run "
                                f"examples/depth_sweep/run.sh first (SWEEP_DIR={sweep_dir}).")
    runs = [load_run(os.path.join(runs_dir, name)) for name in sorted(os.listdir(runs_dir))
            if os.path.isdir(os.path.join(runs_dir, name))]
    sweep = read_key_values(os.path.join(sweep_dir, "sweep.txt"))
    order = {name: i for i, name in enumerate(sweep.get("placements", "").split())}
    inits = {name: i for i, name in enumerate(sweep.get("scale_inits", "").split())}
    runs.sort(key=lambda r: (r.depth, order.get(r.placement, len(order)), r.placement,
                             inits.get(r.scale_init, len(inits)), r.scale_init))
    return runs


def markdown_table(runs: List[SweepRun]) -> str:
    show_init = len({r.scale_init for r in runs}) > 1 or any(
        r.scale_init != "default" for r in runs)
    head = ["placement", "L"] + (["scale_init"] if show_init else []) + [
        "status", "start loss", "final train loss", "final valid loss", "diverged",
        "first spike (iter)", "spikes", "max grad norm", "final grad norm",
        "layer 2/L grad, end", "layer 2/L grad, min", "run time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        v = r.verdict
        cells = [r.placement, str(r.depth)] + ([r.scale_init] if show_init else []) + [
            r.status, fmt(v.start_loss), fmt(v.final_train_loss), fmt(v.final_valid_loss),
            fmt(v.diverged), fmt(v.first_spike_iteration) or "-", str(v.num_spikes),
            fmt(v.max_grad_norm, 3), fmt(v.final_grad_norm, 3), fmt(r.ratio_final, 2),
            fmt(r.ratio_min, 2), fmt(r.seconds, 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot_valid_loss(runs: List[SweepRun]) -> str:
    """Final validation loss: one row per placement (and scale_init), one column per depth."""
    depths = sorted({r.depth for r in runs})
    keys = list(dict.fromkeys((r.placement, r.scale_init) for r in runs))
    table = {(r.placement, r.scale_init, r.depth): r for r in runs}
    lines = ["| placement | scale_init | " + " | ".join(f"L={d}" for d in depths) + " |",
             "|---|---|" + "---:|" * len(depths)]
    for placement, init in keys:
        cells = []
        for d in depths:
            r = table.get((placement, init, d))
            if r is None:
                cells.append("")
                continue
            text = fmt(r.verdict.final_valid_loss)
            if r.status != "ok":
                text = f"{text} ({r.status})".strip()
            cells.append(text)
        lines.append(f"| {placement} | {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(runs: List[SweepRun], sweep: Dict[str, str]) -> str:
    parts = ["# Depth sweep report", ""]
    if sweep:
        settings = ", ".join(f"{k}={v}" for k, v in sweep.items())
        parts += [f"Sweep: {settings}.", ""]
    parts += [
        "Definitions: *start loss* = first logged training loss; *diverged* = a NaN/Inf loss or "
        "grad norm, or final logged training loss above the start loss; *spike* = a logged "
        f"training loss above {spike_factor()}x the median of the last {spike_window()} logged "
        f"values before it (training's --loss-spike-factor / --loss-spike-window rule, judged "
        f"from the {WARMUP + 1}th logged value on; NaN/Inf is divergence, not a spike); "
        "grad norm = global norm before clipping, as logged; *layer 2/L grad* = norm of the "
        "gradient of layer 2's parameters / of the last layer's, from the run's TensorBoard "
        "stability tags (logging steps), at the end and its minimum over the run.",
        "",
        "## Final validation loss",
        "",
        pivot_valid_loss(runs),
        "",
        "## All runs",
        "",
        markdown_table(runs),
        "",
    ]
    return "\n".join(parts)


def plot_curves(runs: List[SweepRun], path: str) -> Optional[str]:
    """Loss (top row) and grad norm (bottom row) against iteration, one column per depth (and
    scale_init), one curve per placement."""
    try:
        from spannorm_megatron.lab.plots import placement_colors, pyplot, save_png
    except ImportError:  # pragma: no cover
        return None
    try:
        plt = pyplot()
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)",
              file=sys.stderr)
        return None
    columns = list(dict.fromkeys((r.depth, r.scale_init) for r in runs))
    placements = list(dict.fromkeys(r.placement for r in runs))
    colors = placement_colors(placements)
    rows = 3 if any(r.layer_grad_ratio for r in runs) else 2
    fig, axes = plt.subplots(rows, len(columns), squeeze=False,
                             figsize=(4.0 * len(columns), 3.0 * rows + 0.4), sharex="col")
    ranges = [[[] for _ in columns] for _ in range(rows)]
    for j, (depth, init) in enumerate(columns):
        for r in runs:
            if (r.depth, r.scale_init) != (depth, init):
                continue
            h = r.history
            for i, values in enumerate((h.train_loss, h.grad_norm)):
                xs = [it for it, v in zip(h.iterations, values) if v is not None]
                ys = [v if math.isfinite(v) and v > 0 else math.nan
                      for v in values if v is not None]
                axes[i][j].plot(xs, ys, color=colors[r.placement], lw=1.2, label=r.placement)
                ranges[i][j] += [y for y in ys if math.isfinite(y)]
            if rows == 3 and r.layer_grad_ratio:
                ys = [v if math.isfinite(v) and v > 0 else math.nan for v in r.layer_grad_ratio]
                axes[2][j].plot(r.ratio_iterations, ys, color=colors[r.placement], lw=1.2,
                                label=r.placement)
                ranges[2][j] += [y for y in ys if math.isfinite(y)]
            if h.valid_iterations:
                ys = [v if v is not None and math.isfinite(v) else math.nan
                      for v in h.valid_loss]
                axes[0][j].plot(h.valid_iterations, ys, color=colors[r.placement], ls="none",
                                marker="o", ms=3)
        title = f"L={depth}" + ("" if init == "default" else f", scale_init={init}")
        axes[0][j].set_title(title, fontsize=10)
        for i in range(rows):
            values = ranges[i][j]
            # Log scale for grad norms and ratios, and for losses that span more than a factor
            # of 20 (a blow-up); an axis with no positive value cannot be drawn on a log scale.
            if values and (i >= 1 or max(values) > 20 * min(values)):
                axes[i][j].set_yscale("log")
            axes[i][j].grid(alpha=0.3)
            axes[i][j].tick_params(labelsize=8)
            if i == 2:
                axes[i][j].axhspan(0.1, 10, color="0.9", zorder=0)
        axes[rows - 1][j].set_xlabel("iteration", fontsize=9)
    axes[0][0].set_ylabel("training loss (dots: validation)", fontsize=9)
    axes[1][0].set_ylabel("grad norm (before clipping)", fontsize=9)
    if rows == 3:
        axes[2][0].set_ylabel("|grad layer 2 params| /\n|grad layer L params|", fontsize=8)
    handles, labels = [], []
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9,
               bbox_to_anchor=(0.5, 0.995), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return save_png(fig, path)


def write_report(sweep_dir: str, out_dir: Optional[str] = None, log=print,
                 export: bool = False) -> List[str]:
    """report.md, report.csv, report.json and loss_curves.png for the sweep in `sweep_dir`.
    `export` (for docs/): report.md, loss_curves.png and the one compressed table,
    report.json.gz, instead (the CSV's rows are the JSON's runs without their histories)."""
    out_dir = out_dir or sweep_dir
    os.makedirs(out_dir, exist_ok=True)
    runs = load_sweep(sweep_dir)
    sweep = read_key_values(os.path.join(sweep_dir, "sweep.txt"))
    written = []
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(report_markdown(runs, sweep))
    written.append(path)
    if not export:
        path = os.path.join(out_dir, "report.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(REPORT_COLUMNS)
            for r in runs:
                row = r.row()
                writer.writerow([fmt(row[c], 6) for c in REPORT_COLUMNS])
        written.append(path)
    text = json.dumps({
        "sweep": sweep,
        "definitions": {"spike_factor": spike_factor(), "spike_window": spike_window()},
        "runs": [dict(r.row(), source=r.source, diverged_reason=r.verdict.diverged_reason,
                      history={"iterations": r.history.iterations,
                               "train_loss": _jsonable(r.history.train_loss),
                               "grad_norm": _jsonable(r.history.grad_norm),
                               "valid_iterations": r.history.valid_iterations,
                               "valid_loss": _jsonable(r.history.valid_loss),
                               "ratio_iterations": r.ratio_iterations,
                               "layer_grad_ratio": _jsonable(r.layer_grad_ratio)})
                 for r in runs],
    }, indent=1) + "\n"
    if export:
        written.append(write_compressed(os.path.join(out_dir, "report.json.gz"), text))
    else:
        path = os.path.join(out_dir, "report.json")
        with open(path, "w") as f:
            f.write(text)
        written.append(path)
    png = plot_curves(runs, os.path.join(out_dir, "loss_curves.png"))
    if png:
        written.append(png)
    if log is not None:
        log(f"{len(runs)} runs; wrote {', '.join(written)}")
    return written


def _jsonable(values):
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
        elif isinstance(v, float) and math.isinf(v):
            out.append("inf" if v > 0 else "-inf")
        else:
            out.append(float(v))
    return out


@dataclass
class ReportCommand:
    """`examples/depth_sweep/report.py`'s options (declared once)."""

    out: Optional[str] = option(None, "Where to write the report (default: sweep_dir).",
                                path="output_folder")
    export: bool = option(False, "Write what the docs keep: report.md, loss_curves.png and "
                                 "the one compressed table report.json.gz (no CSV), "
                                 "overwriting the files in --out.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Report of a depth sweep (examples/depth_sweep/run.sh): final losses, "
                    "divergence, first loss spike, grad norms; Markdown, CSV, JSON and a PNG.")
    p.add_argument("sweep_dir", help="SWEEP_DIR of run.sh (holds runs/ and sweep.txt).",
                   type=path_type("input_folder"))
    add_arguments(p, ReportCommand)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    namespace = parse_options(build_parser(), [ReportCommand], argv)
    command = from_namespace(ReportCommand, namespace)
    try:
        write_report(namespace.sweep_dir, command.out, export=command.export)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
