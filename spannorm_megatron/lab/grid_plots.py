"""PNG figures of the factor grid's results table (results.jsonl rows, `lab.grid`).

Runs of the same cell, depth and placement are pooled over seeds whichever group ran them.

    grid_deepest_bits_per_byte.png   at the grid's largest depth (128): validation bits per
                                 byte of every run (dots, one per seed) and their mean (bar) per
                                 cell and placement; bits per byte compares cells with different
                                 tokenizers
    grid_grad_ratio.png          layer-2/L gradient-norm ratio against iteration at that depth for
                                 the cells that decide the verdicts, every seed, log y; the
                                 collapse alarm's threshold dashed
    grid_projection_rms.png      output projections' RMS (attention, mean over layers) over
                                 training, relative to the std they were drawn with, under
                                 scale_mode init and forward (base and forward cells)
    grid_depth.png               validation bits per byte against depth per cell run at several
    grid_output_layer_share.png  the output layer's gradient norm over the global one against
                                 iteration (runs that logged it)

A figure whose runs are not in the table (yet) is not drawn.
"""

from __future__ import annotations

import math
from statistics import mean
from typing import Dict, List, Optional, Sequence, Tuple

from spannorm_megatron.lab.plots import pyplot, save_png
from spannorm_megatron.lab.rules import collapse_threshold

PLACEMENT_ORDER = ("spannorm", "spannorm_clean", "prenorm", "postnorm", "deepnorm", "perinorm")
COLORS = {"spannorm": "#1f77b4", "spannorm_clean": "#2ca02c", "prenorm": "#ff7f0e",
          "postnorm": "#d62728", "deepnorm": "#9467bd", "perinorm": "#8c564b"}
DECISIVE_CELLS = ("base", "tokenizer=bytes", "corpus=shakespeare+tokenizer=bytes",
                  "tokenizer=sp512")


def _ok(rows: Sequence[dict]) -> List[dict]:
    return [r for r in rows if r.get("status") == "ok"]


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _placements(rows: Sequence[dict]) -> List[str]:
    present = {r["placement"] for r in rows}
    return [p for p in PLACEMENT_ORDER if p in present] + sorted(present - set(PLACEMENT_ORDER))


def _cells(rows: Sequence[dict]) -> List[str]:
    """Cells in grid order (the first run of each)."""
    seen: Dict[str, int] = {}
    for r in sorted(rows, key=lambda r: r.get("index", 0)):
        seen.setdefault(r["cell"], r.get("index", 0))
    return list(seen)


def pooled(rows: Sequence[dict], depth: int) -> Dict[Tuple[str, str], List[dict]]:
    """(cell, placement) -> the finished runs at `depth`, every seed."""
    out: Dict[Tuple[str, str], List[dict]] = {}
    for r in _ok(rows):
        if int(r["depth"]) == depth:
            out.setdefault((r["cell"], r["placement"]), []).append(r)
    return out


def deepest(rows: Sequence[dict]) -> int:
    return max((int(r["depth"]) for r in _ok(rows)), default=0)


def plot_bits_per_byte(rows: Sequence[dict], path: str) -> Optional[str]:
    depth = deepest(rows)
    at_depth = [r for r in _ok(rows) if int(r["depth"]) == depth]
    if not at_depth:
        return None
    plt = pyplot()
    cells, placements = _cells(at_depth), _placements(at_depth)
    groups = pooled(at_depth, depth)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(cells) + 2), 4.6))
    width = 0.8 / max(1, len(placements))
    for j, placement in enumerate(placements):
        for i, cell in enumerate(cells):
            values = [v for v in (_number(r.get("valid_bits_per_byte"))
                                  for r in groups.get((cell, placement), [])) if v is not None]
            if not values:
                continue
            x = i + (j - (len(placements) - 1) / 2) * width
            ax.bar(x, mean(values), width * 0.9, color=COLORS.get(placement, "0.5"), alpha=0.35,
                   label=placement if i == next(k for k, c in enumerate(cells)
                                                if groups.get((c, placement))) else None)
            ax.plot([x] * len(values), values, "o", ms=3, color=COLORS.get(placement, "0.5"))
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([c.replace("+", "\n+") for c in cells], rotation=60, ha="right",
                       fontsize=7)
    ax.set_ylabel("validation bits per byte (lower is better)", fontsize=8)
    ax.set_title(f"{depth} layers: every run (dots: seeds) and the mean (bar), per cell",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(placements), loc="upper center", frameon=False)
    fig.tight_layout()
    return save_png(fig, path)


def _series(row: dict, iterations_key: str, values_key: str, source: str = "history"):
    data = row.get(source) or {}
    its, values = data.get(iterations_key) or [], data.get(values_key) or []
    pts = [(i, v) for i, v in zip(its, values) if _number(v) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_grad_ratio(rows: Sequence[dict], path: str,
                    threshold: Optional[float] = None) -> Optional[str]:
    """`threshold` (dashed): the collapse alarm's default unless given."""
    at128 = [r for r in _ok(rows) if int(r["depth"]) == deepest(rows)]
    cells = [c for c in DECISIVE_CELLS if any(r["cell"] == c for r in at128)]
    if not cells:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cells), squeeze=False, figsize=(4.0 * len(cells), 3.6),
                             sharey=True)
    for ax, cell in zip(axes[0], cells):
        labelled = set()
        for r in sorted((r for r in at128 if r["cell"] == cell), key=lambda r: r["seed"]):
            xs, ys = _series(r, "ratio_iterations", "layer_grad_ratio")
            ys = [max(y, 1e-20) for y in ys]
            placement = r["placement"]
            ax.plot(xs, ys, lw=1, color=COLORS.get(placement, "0.5"),
                    label=placement if placement not in labelled else None)
            labelled.add(placement)
        ax.axhline(collapse_threshold() if threshold is None else threshold, color="0.3",
                   ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("grad norm layer 2 / layer L (every seed)", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_projection_rms(rows: Sequence[dict], path: str) -> Optional[str]:
    """RMS / the std the projections were drawn with: under scale_mode init that is sigma x
    Scale Init's factor c, under forward sigma (the branch output is multiplied by c instead),
    so in both modes 1 is where Scale Init put the branch's effective weight."""
    at128 = [r for r in _ok(rows) if int(r["depth"]) == deepest(rows) and r["cell"] in (
        "base", "scale_mode=forward") and (r.get("projection_rms") or {}).get("iterations")]
    if not at128:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), sharey=True)
    for ax, mode in zip(axes, ("init", "forward")):
        labelled = set()
        for r in (r for r in at128 if r.get("scale_mode") == mode):
            its, values = _series(r, "iterations", "attn_mean", source="projection_rms")
            drawn = _number(r.get("proj_init_std"))
            if not its or not drawn:
                continue
            placement = r["placement"]
            ax.plot([0, *its], [1.0, *(v / drawn for v in values)], marker="o", ms=2, lw=1,
                    color=COLORS.get(placement, "0.5"),
                    label=placement if placement not in labelled else None)
            labelled.add(placement)
        ax.set_yscale("log")
        ax.axhline(1.0, color="0.3", ls="--", lw=0.8)
        ax.set_title(f"scale_mode {mode}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel("attention output projection RMS / its init std", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_depth(rows: Sequence[dict], path: str) -> Optional[str]:
    ok = _ok(rows)
    if not ok:
        return None
    plt = pyplot()
    depths = sorted({int(r["depth"]) for r in ok})
    cells = [c for c in _cells(ok)
             if len({int(r["depth"]) for r in ok if r["cell"] == c}) > 1]
    if not cells:
        cells = _cells(ok)[:1]
    fig, axes = plt.subplots(1, len(cells), squeeze=False, figsize=(3.6 * len(cells), 3.4))
    for ax, cell in zip(axes[0], cells):
        for placement in _placements(ok):
            pts = []
            for depth in depths:
                values = [v for v in (_number(r.get("valid_bits_per_byte")) for r in ok
                                      if r["cell"] == cell and r["placement"] == placement
                                      and int(r["depth"]) == depth) if v is not None]
                if values:
                    pts.append((depth, mean(values)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4,
                        color=COLORS.get(placement, "0.5"), label=placement)
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths)
        ax.set_xticklabels([str(d) for d in depths])
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("layers", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("validation bits per byte (mean over seeds)", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def output_layer_share(row: dict) -> Tuple[List[int], List[float]]:
    """(iterations, output layer's grad norm / global grad norm) of a run that logged both."""
    signals = row.get("signals") or {}
    pts = [(i, o / t) for i, o, t in zip(signals.get("iterations") or [],
                                         signals.get("output_layer/grad_norm") or [],
                                         signals.get("total/grad_norm") or [])
           if _number(o) is not None and _number(t)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_output_layer_share(rows: Sequence[dict], path: str) -> Optional[str]:
    runs = [r for r in _ok(rows) if output_layer_share(r)[0]
            and int(r["depth"]) == deepest(rows)]
    if not runs:
        return None
    plt = pyplot()
    cells = _cells(runs)
    fig, axes = plt.subplots(1, len(cells), squeeze=False, figsize=(3.6 * len(cells), 3.4),
                             sharey=True)
    for ax, cell in zip(axes[0], cells):
        labelled = set()
        for r in (r for r in runs if r["cell"] == cell):
            its, share = output_layer_share(r)
            placement = r["placement"]
            ax.plot(its, share, lw=1, color=COLORS.get(placement, "0.5"),
                    label=placement if placement not in labelled else None)
            labelled.add(placement)
        ax.set_title(cell, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("output layer's share of the gradient norm", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_grid(rows: Sequence[dict], out_dir: str) -> List[str]:
    """Every figure above into `out_dir`; returns the files written."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    written = [
        plot_bits_per_byte(rows, os.path.join(out_dir, "grid_deepest_bits_per_byte.png")),
        plot_grad_ratio(rows, os.path.join(out_dir, "grid_grad_ratio.png")),
        plot_projection_rms(rows, os.path.join(out_dir, "grid_projection_rms.png")),
        plot_depth(rows, os.path.join(out_dir, "grid_depth.png")),
        plot_output_layer_share(rows, os.path.join(out_dir, "grid_output_layer_share.png")),
    ]
    return [p for p in written if p]
