"""Summaries and files of a signal-propagation sweep: per-layer CSV, summary CSV and Markdown,
and one JSON with the settings, the summary, the per-layer values and the training traces.

Summary columns, one row per (placement, depth, scale_init, step); layers are 1-based, L is
the depth:

    loss                   mean next-token loss on the fixed batch at that step
    grad_in_2_over_L       input_grad_norm[2] / input_grad_norm[L]: how much the gradient
                           reaching layer 2's input differs from the one reaching the last
                           layer's input (1 = no change with depth; >> 1 grows toward the
                           bottom, << 1 vanishes toward the bottom)
    grad_spread            max(r, 1/r) of that ratio r: the factor, either way
    bounded_10x            grad_spread < 10 (the test's criterion)
    param_grad_1_over_L    param_grad_norm[1] / param_grad_norm[L]
    output_rms_first/last  output_rms of layer 1 / layer L
    output_rms_max_over_min   max / min of output_rms over the layers (stream growth)
    branch_rms_max         largest attention_rms or mlp_rms of any layer
    cosine_prev_mean       mean of cosine_prev over layers 2..L
    token_cosine_last      token_cosine of layer L
    finite                 every per-layer value and the loss are finite
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

from spannorm_megatron.lab.propagation import (
    LAYER_SIGNALS,
    ProbeResult,
    PropagationRun,
    grad_ratio,
)

SUMMARY_COLUMNS = (
    "placement", "depth", "scale_init", "resolved_scale_init", "output_projection_std", "step",
    "loss", "grad_in_2_over_L", "grad_spread", "bounded_10x", "param_grad_1_over_L",
    "output_rms_first", "output_rms_last", "output_rms_max_over_min", "branch_rms_max",
    "cosine_prev_mean", "token_cosine_last", "finite",
)

KEY_COLUMNS = ("placement", "depth", "scale_init", "step")


def _ratio(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b


def _finite(values: Iterable[float]) -> List[float]:
    return [v for v in values if math.isfinite(v)]


def summarize_result(result: ProbeResult) -> dict:
    """One summary row (see the module docstring)."""
    layers = result.layers
    ratio = grad_ratio(result)
    spread = max(ratio, 1.0 / ratio) if math.isfinite(ratio) and ratio > 0 else math.inf
    out_rms = layers["output_rms"]
    finite_rms = _finite(out_rms)
    branches = _finite(layers["attention_rms"] + layers["mlp_rms"])
    cosines = _finite(layers["cosine_prev"][1:])
    all_finite = math.isfinite(result.loss) and all(
        math.isfinite(v) for signal in LAYER_SIGNALS for v in layers[signal]
        if signal != "token_cosine")
    return {
        "placement": result.placement,
        "depth": result.depth,
        "scale_init": result.scale_init,
        "resolved_scale_init": result.resolved_scale_init,
        "output_projection_std": result.output_projection_std,
        "step": result.step,
        "loss": result.loss,
        "grad_in_2_over_L": ratio,
        "grad_spread": spread,
        "bounded_10x": bool(spread < 10),
        "param_grad_1_over_L": _ratio(layers["param_grad_norm"][0],
                                      layers["param_grad_norm"][-1]),
        "output_rms_first": out_rms[0],
        "output_rms_last": out_rms[-1],
        "output_rms_max_over_min": (max(finite_rms) / min(finite_rms)
                                    if finite_rms and min(finite_rms) > 0 else math.nan),
        "branch_rms_max": max(branches) if branches else math.nan,
        "cosine_prev_mean": sum(cosines) / len(cosines) if cosines else math.nan,
        "token_cosine_last": layers["token_cosine"][-1],
        "finite": all_finite,
    }


def summarize(run: PropagationRun) -> List[dict]:
    return [summarize_result(r) for r in run.results]


def fmt(value, digits: int = 4) -> str:
    """A compact, round-trippable-enough text form for CSV/Markdown (None: empty)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def _json_number(value, digits: int = 5):
    if isinstance(value, float):
        if not math.isfinite(value):
            return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return float(f"{value:.{digits}g}")
    return value


def write_layers_csv(run: PropagationRun, path: str, digits: int = 4) -> None:
    """Long format: one row per (placement, depth, scale_init, step, layer)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(KEY_COLUMNS) + ["layer"] + list(LAYER_SIGNALS))
        for r in run.results:
            for i in range(r.depth):
                writer.writerow([r.placement, r.depth, r.scale_init, r.step, i + 1]
                                + [fmt(r.layers[s][i], digits) for s in LAYER_SIGNALS])


def write_summary_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_COLUMNS)
        for row in rows:
            writer.writerow([fmt(row[c]) for c in SUMMARY_COLUMNS])


def write_json(run: PropagationRun, rows: Sequence[dict], path: str,
               per_layer: bool = True, digits: int = 6) -> None:
    """Settings, summary rows, training traces and (with `per_layer`) every per-layer value.

    Non-finite numbers are written as null (NaN) or the strings "inf"/"-inf" (JSON has none).
    """
    doc = {
        "meta": run.meta(),
        "layer_signals": list(LAYER_SIGNALS),
        "summary": [{k: _json_number(v) for k, v in row.items()} for row in rows],
        "training": [
            {"placement": t.placement, "depth": t.depth, "scale_init": t.scale_init,
             "seconds": round(t.seconds, 1),
             "loss": [_json_number(v, 4) for v in t.losses],
             "grad_norm": [_json_number(v, 4) for v in t.grad_norms]}
            for t in run.traces
        ],
    }
    if per_layer:
        doc["results"] = [
            {"placement": r.placement, "depth": r.depth, "scale_init": r.scale_init,
             "step": r.step, "loss": _json_number(r.loss),
             "layers": {s: [_json_number(v, digits) for v in r.layers[s]]
                        for s in LAYER_SIGNALS}}
            for r in run.results
        ]
    if not isinstance(path, str):  # a text stream
        dump_json_lines(doc, path)
        return
    with open(path, "w") as f:
        dump_json_lines(doc, f)


def dump_json_lines(doc: dict, f) -> None:
    """A JSON object with one line per top-level key, and one line per element of top-level
    lists of objects: compact, yet readable and diff-friendly."""
    compact = dict(separators=(",", ":"), allow_nan=False)
    items = list(doc.items())
    f.write("{\n")
    for i, (key, value) in enumerate(items):
        f.write(f"{json.dumps(key)}: ")
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            f.write("[\n" + ",\n".join(json.dumps(v, **compact) for v in value) + "\n]")
        else:
            f.write(json.dumps(value, **compact))
        f.write(",\n" if i < len(items) - 1 else "\n")
    f.write("}\n")


def _from_json_number(value) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return float(value)
    return float(value)


def load_json(path: str) -> PropagationRun:
    """A PropagationRun back from `signals.json` (or the docs' compressed `signals.json.gz`)
    written with per-layer values, so that its summary and plots can be made again without
    re-running the models."""
    import gzip

    from spannorm_megatron.lab.propagation import ProbeSettings, TrainingTrace

    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        doc = json.load(f)
    if "results" not in doc:
        doc["results"] = _results_from_layers_csv(path, doc)
    meta = doc["meta"]
    settings = dict(meta["settings"])
    settings["measure_at"] = tuple(settings["measure_at"])
    run = PropagationRun(
        settings=ProbeSettings(**settings), batch_description=meta["tokens"],
        seq_length=meta["seq_length"], batch_size=meta["batch_size"],
        vocab_size=meta["vocab_size"], placements=list(meta["placements"]),
        depths=list(meta["depths"]), scale_inits=list(meta["scale_inits"]),
        seconds=meta.get("seconds", 0.0))
    summary = {(r["placement"], r["depth"], r["scale_init"], r["step"]): r
               for r in doc["summary"]}
    for r in doc["results"]:
        row = summary[(r["placement"], r["depth"], r["scale_init"], r["step"])]
        run.results.append(ProbeResult(
            placement=r["placement"], depth=r["depth"], scale_init=r["scale_init"],
            resolved_scale_init=row["resolved_scale_init"],
            output_projection_std=_from_json_number(row["output_projection_std"]),
            step=r["step"], loss=_from_json_number(r["loss"]),
            layers={k: [_from_json_number(v) for v in values]
                    for k, values in r["layers"].items()}))
    for t in doc.get("training", []):
        run.traces.append(TrainingTrace(
            t["placement"], t["depth"], t["scale_init"],
            [_from_json_number(v) for v in t["loss"]],
            [_from_json_number(v) for v in t["grad_norm"]], t.get("seconds", 0.0)))
    return run


def _results_from_layers_csv(json_path: str, doc: dict) -> List[dict]:
    """Per-layer values from the layers.csv (or layers.csv.gz) beside a JSON written with
    --no-per-layer-json, in the JSON's `results` form."""
    import gzip

    folder = os.path.dirname(os.path.abspath(json_path))
    for name, opener in (("layers.csv", open), ("layers.csv.gz", gzip.open)):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            break
    else:
        raise ValueError(f"{json_path} has no per-layer values (written with "
                         f"--no-per-layer-json) and no layers.csv(.gz) lies beside it.")
    losses = {(r["placement"], r["depth"], r["scale_init"], r["step"]): r["loss"]
              for r in doc["summary"]}
    results: Dict[tuple, dict] = {}
    with opener(candidate, "rt", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["placement"], int(row["depth"]), row["scale_init"], int(row["step"]))
            entry = results.setdefault(key, {
                "placement": key[0], "depth": key[1], "scale_init": key[2], "step": key[3],
                "loss": losses.get(key), "layers": {s: [None] * key[1] for s in LAYER_SIGNALS}})
            layer = int(row["layer"]) - 1
            for signal in LAYER_SIGNALS:
                entry["layers"][signal][layer] = float(row[signal])
    return list(results.values())


def pivot_markdown(rows: Sequence[dict], value: str, step: int, digits: int = 3,
                   placements: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of `value`: one row per (placement, scale_init), one column per depth."""
    rows = [r for r in rows if r["step"] == step]
    depths = sorted({r["depth"] for r in rows})
    order = list(placements) if placements else list(dict.fromkeys(r["placement"] for r in rows))
    inits = list(dict.fromkeys(r["scale_init"] for r in rows))
    table: Dict[tuple, dict] = {(r["placement"], r["scale_init"], r["depth"]): r for r in rows}
    lines = ["| placement | scale_init | " + " | ".join(f"L={d}" for d in depths) + " |",
             "|---|---|" + "---:|" * len(depths)]
    for placement in order:
        for init in inits:
            cells = []
            for d in depths:
                row = table.get((placement, init, d))
                cells.append(fmt(row[value], digits) if row else "")
            if any(cells):
                lines.append(f"| {placement} | {init} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(run: PropagationRun, rows: Sequence[dict]) -> str:
    """The summary as Markdown: settings, then one pivot table per headline number and step."""
    meta = run.meta()
    s = meta["settings"]
    parts = [
        "# Signal propagation summary",
        "",
        f"hidden {s['hidden_size']}, heads {s['num_attention_heads']}, ffn "
        f"{s['ffn_hidden_size'] or 4 * s['hidden_size']}, {s['normalization']}, init std "
        f"{s['init_method_std']:.4g}, seed {s['seed']}; batch {meta['batch_size']} x seq "
        f"{meta['seq_length']}, tokens: {meta['tokens']}. "
        + (f"Training between measurements: AdamW lr {s['lr']:g}, clip {s['clip_grad']:g}, on "
           f"the same fixed batch; measured at steps {s['measure_at']}"
           if max(s["measure_at"]) > 0 else "Measured at initialization only")
        + f"; {meta['seconds']:.0f} s.",
        "",
    ]
    tables = [
        ("grad_in_2_over_L", "|dL/dx| at layer 2's input / at the last layer's input"),
        ("output_rms_last", "RMS of the last layer's output"),
        ("output_rms_max_over_min", "max/min over layers of the output RMS"),
        ("cosine_prev_mean", "mean cos(x_l, x_{l-1}) over layers 2..L"),
        ("loss", "loss on the fixed batch"),
    ]
    for step in s["measure_at"]:
        when = "at initialization" if step == 0 else f"after {step} steps"
        for value, title in tables:
            if value == "loss" and step == 0:
                continue
            parts += [f"## {title}, {when}", "",
                      pivot_markdown(rows, value, step, placements=run.placements), ""]
    return "\n".join(parts)


def write_outputs(run: PropagationRun, out_dir: str, *, plots: bool = True,
                  per_layer_json: bool = True, export: bool = False, log=print) -> List[str]:
    """Write every output file into `out_dir`; returns their paths. `export` (for docs/):
    summary.md, the figures and the one compressed table, signals.json.gz with every per-layer
    value, instead of the CSVs and signals.json."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(run)
    written = []

    def path(name):
        p = os.path.join(out_dir, name)
        written.append(p)
        return p

    if export:
        import io

        from spannorm_megatron.lab.compressed import write_compressed

        text = io.StringIO()
        write_json(run, rows, text, per_layer=True)
        write_compressed(path("signals.json.gz"), text.getvalue())
    else:
        write_layers_csv(run, path("layers.csv"))
        write_summary_csv(rows, path("summary.csv"))
        write_json(run, rows, path("signals.json"), per_layer=per_layer_json)
    with open(path("summary.md"), "w") as f:
        f.write(summary_markdown(run, rows) + "\n")
    if plots:
        from spannorm_megatron.lab.plots import plot_propagation

        written += plot_propagation(run, rows, out_dir)
    if log is not None:
        log(f"wrote {len(written)} files to {out_dir}")
    return written
