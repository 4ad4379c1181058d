"""PNG plots of a signal-propagation sweep (matplotlib, Agg backend: no display needed).

Files (N = the step count of the measurement, 0 = initialization):

    {signal}_step{N}.png   one per per-layer signal: a grid of panels, rows = scale_init,
                           columns = depth, x = layer, one curve per placement (log y for
                           RMS and gradient norms, linear for cosines)
    grad_ratio.png         |grad at layer 2's input| / |grad at the last layer's input| against
                           depth (log-log), one panel per (step, scale_init), one curve per
                           placement; the band 1/10..10 is shaded
    training_loss.png      loss on the fixed batch per step (when the sweep trained)
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence

from spannorm_megatron.lab.propagation import LAYER_SIGNALS, PropagationRun

LOG_SCALE = {"output_rms", "attention_rms", "mlp_rms", "input_grad_norm", "param_grad_norm"}
TITLES = {
    "output_rms": "RMS of the layer output (residual stream)",
    "attention_rms": "RMS of the attention branch output",
    "mlp_rms": "RMS of the MLP branch output",
    "input_grad_norm": "|dLoss/d layer input|",
    "param_grad_norm": "|dLoss/d layer parameters|",
    "cosine_prev": "cos(layer output, layer input), token mean",
    "token_cosine": "mean cosine between tokens of a sequence",
}
DPI = 72


def pyplot():
    """matplotlib.pyplot on the Agg backend (import here: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def placement_colors(placements: Sequence[str]) -> Dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf"]
    # SpanNorm in a fixed, strong colour when present; others in registry order.
    return {p: palette[i % len(palette)] for i, p in enumerate(placements)}


def _clean(values: Sequence[float], log: bool) -> List[float]:
    out = []
    for v in values:
        if v is None or not math.isfinite(v) or (log and v <= 0):
            out.append(math.nan)
        else:
            out.append(v)
    return out


def save_png(fig, path: str, dpi: int = DPI, colors: int = 128) -> str:
    """Save `fig` as a palette PNG (at most `colors` colours): line plots lose nothing visible
    and the file is 2-3x smaller than full-colour, so result figures can live in the repo."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    buffer.seek(0)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        return path
    image = Image.open(buffer).convert("RGB")
    image.quantize(colors=colors, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def _save(fig, path: str) -> str:
    return save_png(fig, path)


def plot_signal(run: PropagationRun, signal: str, step: int, path: str) -> str:
    plt = pyplot()
    inits, depths = run.scale_inits, run.depths
    colors = placement_colors(run.placements)
    by_key = {(r.placement, r.depth, r.scale_init): r for r in run.results if r.step == step}
    fig, axes = plt.subplots(len(inits), len(depths), squeeze=False,
                             figsize=(3.6 * len(depths), 2.8 * len(inits) + 0.8))
    log = signal in LOG_SCALE
    for i, init in enumerate(inits):
        for j, depth in enumerate(depths):
            ax = axes[i][j]
            for placement in run.placements:
                result = by_key.get((placement, depth, init))
                if result is None:
                    continue
                ys = _clean(result.layers[signal], log)
                ax.plot(range(1, depth + 1), ys, color=colors[placement], lw=1.3,
                        label=placement)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"L={depth}, scale_init={init}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == len(inits) - 1:
                ax.set_xlabel("layer", fontsize=8)
    when = "at initialization" if step == 0 else f"after {step} training steps"
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(run.placements), fontsize=9,
               bbox_to_anchor=(0.5, 0.995), frameon=False)
    fig.suptitle(f"{TITLES.get(signal, signal)}, {when}", y=0.955, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def plot_grad_ratio(run: PropagationRun, rows: Sequence[dict], path: str) -> str:
    plt = pyplot()
    steps = sorted({r["step"] for r in rows})
    colors = placement_colors(run.placements)
    fig, axes = plt.subplots(len(steps), len(run.scale_inits), squeeze=False,
                             figsize=(4.2 * len(run.scale_inits), 3.2 * len(steps) + 0.8))
    for i, step in enumerate(steps):
        for j, init in enumerate(run.scale_inits):
            ax = axes[i][j]
            ax.axhspan(0.1, 10, color="0.9", zorder=0)
            for placement in run.placements:
                pts = sorted((r["depth"], r["grad_in_2_over_L"]) for r in rows
                             if r["step"] == step and r["scale_init"] == init
                             and r["placement"] == placement)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                ys = _clean([p[1] for p in pts], True)
                ax.plot(xs, ys, marker="o", ms=3, color=colors[placement], label=placement)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(run.depths)
            ax.set_xticklabels([str(d) for d in run.depths])
            when = "init" if step == 0 else f"step {step}"
            ax.set_title(f"scale_init={init}, {when}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == len(steps) - 1:
                ax.set_xlabel("depth L", fontsize=8)
            if j == 0:
                ax.set_ylabel("grad(layer 2 in) / grad(layer L in)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(run.placements), fontsize=9,
               bbox_to_anchor=(0.5, 0.995), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return _save(fig, path)


def plot_training(run: PropagationRun, path: str) -> str:
    plt = pyplot()
    colors = placement_colors(run.placements)
    traces = {(t.placement, t.depth, t.scale_init): t for t in run.traces}
    fig, axes = plt.subplots(len(run.scale_inits), len(run.depths), squeeze=False,
                             figsize=(3.6 * len(run.depths), 2.8 * len(run.scale_inits) + 0.8))
    for i, init in enumerate(run.scale_inits):
        for j, depth in enumerate(run.depths):
            ax = axes[i][j]
            for placement in run.placements:
                trace = traces.get((placement, depth, init))
                if trace is None:
                    continue
                ax.plot(range(len(trace.losses)), _clean(trace.losses, True),
                        color=colors[placement], lw=1.3, label=placement)
            ax.set_yscale("log")
            ax.set_title(f"L={depth}, scale_init={init}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == len(run.scale_inits) - 1:
                ax.set_xlabel("optimizer step (fixed batch)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(run.placements), fontsize=9,
               bbox_to_anchor=(0.5, 0.995), frameon=False)
    fig.suptitle("loss on the fixed batch", y=0.955, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def plot_propagation(run: PropagationRun, rows: Sequence[dict], out_dir: str) -> List[str]:
    written = []
    for step in sorted({r.step for r in run.results}):
        for signal in LAYER_SIGNALS:
            written.append(plot_signal(run, signal, step,
                                       os.path.join(out_dir, f"{signal}_step{step}.png")))
    written.append(plot_grad_ratio(run, rows, os.path.join(out_dir, "grad_ratio.png")))
    if run.traces:
        written.append(plot_training(run, os.path.join(out_dir, "training_loss.png")))
    return written
