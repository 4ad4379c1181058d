"""The collapse mechanism, from the signals the grid's runs record (what the logged signals show of why deep SpanNorm runs collapse).

Every grid row (`lab/grid/`, results.jsonl) keeps, for layers 1, 2, L/2 ("mid") and L and as
the maximum over all layers ("max"), the per-layer signals `spannorm-train` logs every
`--log-interval` steps (`metrics/stability.py`): output_rms (the residual stream after the
layer), attention_rms and mlp_rms (the branch outputs), grad_norm and update_ratio; and the
layer-2/L gradient-norm ratio at every logged step.

A run *collapses* when that ratio falls below `threshold` (default: the collapse alarm's,
`--collapse-grad-ratio`, read by `lab.rules`: the grid's healthy 128-layer runs stay above
0.02, the stalled ones fall below 1e-5); the collapse iteration is the
first logged step where it does. For every run this module takes the signals at three moments:
one logging interval before the collapse ("before"), at it ("at"), and the last logged step
("end"). A run that does not collapse is read at the median collapse iteration of the collapsing
runs of the same placement and scale mode (else of its scale mode: Scale Init as weights
collapses earlier than as a forward multiplier), so the two kinds are compared at the same point
of the schedule.

N2's input is not logged itself. Where its parts are, it is estimated as the RMS of a sum of
uncorrelated parts: SpanNorm's N2 reads x + F(h), so sqrt(output_rms(l-1)^2 + mlp_rms(l)^2)
(layer 2: layer 1's output is logged; mid: its own output stands in for the one before, as the
stream's RMS is the same in adjacent layers of a normalized stream); PostNorm's and
spannorm_clean's N2 read h + F(h) with h = N1(...), whose RMS is N1's gain (1 at init), so
sqrt(1 + mlp_rms^2) assumes the gain stayed 1; PreNorm's N2 reads x + A(N1(x)), so
sqrt(output_rms(l-1)^2 + attention_rms(l)^2). The branch share mlp_rms / N2-input RMS is what
decides how much a normalized block shrinks the gradient that passes through it.
"""

from __future__ import annotations

import json
import math
import os
from statistics import median
from typing import Dict, List, Optional, Sequence

from spannorm_megatron.lab.rules import collapse_threshold

LAYERS = ("1", "2", "mid", "L", "max")
MOMENTS = ("before", "at", "end")


def _value(series: Sequence, iterations: Sequence[int], at: int) -> Optional[float]:
    """The value logged at the last logging step <= `at` (None if there is none)."""
    best = None
    for i, value in zip(iterations, series):
        if i <= at and value is not None:
            best = value
    return best


def collapse_iteration(row: dict, threshold: float) -> Optional[int]:
    history = row.get("history") or {}
    ratios = zip(history.get("ratio_iterations") or [], history.get("layer_grad_ratio") or [])
    for i, ratio in ratios:
        if ratio is not None and ratio < threshold:
            return int(i)
    return None


def n2_input_rms(placement: str, signals: Dict[str, float], layer: str) -> Optional[float]:
    """Estimated RMS of N2's input in `layer` (2 or mid), see the module docstring."""
    def get(name):
        return signals.get(name)
    before = {"2": "1", "mid": "mid"}[layer]
    mlp, attn, stream = get(f"{layer}/mlp_rms"), get(f"{layer}/attention_rms"), \
        get(f"{before}/output_rms")
    if placement == "spannorm" and None not in (mlp, stream):
        return math.sqrt(stream ** 2 + mlp ** 2)
    if placement in ("postnorm", "spannorm_clean") and mlp is not None:
        return math.sqrt(1.0 + mlp ** 2)
    if placement == "prenorm" and None not in (attn, stream):
        return math.sqrt(stream ** 2 + attn ** 2)
    return None


def run_signals(row: dict, threshold: float, reference: Dict[object, int]) -> Optional[dict]:
    """The run's signals before / at / after its collapse (or at the reference iteration)."""
    signals = row.get("signals") or {}
    iterations = signals.get("iterations") or []
    if not iterations:
        return None
    history = row.get("history") or {}
    collapse = collapse_iteration(row, threshold)
    at = collapse
    for key in ((row.get("placement"), row.get("scale_mode")), row.get("scale_mode"), "all"):
        if at is None:
            at = reference.get(key)
    if at is None:
        return None
    step = iterations[1] - iterations[0] if len(iterations) > 1 else 1
    moments = {"before": at - step, "at": at, "end": iterations[-1]}
    out = {"name": row["name"], "placement": row["placement"], "depth": row["depth"],
           "cell": row.get("cell"), "seed": row.get("seed"), "scale_mode": row.get("scale_mode"),
           "tokenizer": row.get("tokenizer"), "final_valid_loss": row.get("final_valid_loss"),
           "collapses": collapse is not None, "collapse_iteration": collapse,
           "read_at": moments}
    for moment, it in moments.items():
        values = {key: _value(series, iterations, it) for key, series in signals.items()
                  if key != "iterations" and isinstance(series, list)}
        values["grad_ratio"] = _value(history.get("layer_grad_ratio") or [],
                                      history.get("ratio_iterations") or [], it)
        for layer in ("2", "mid"):
            n2 = n2_input_rms(row["placement"], values, layer)
            values[f"{layer}/n2_input_rms_est"] = n2
            mlp = values.get(f"{layer}/mlp_rms")
            values[f"{layer}/branch_share"] = mlp / n2 if n2 and mlp is not None else None
        out[moment] = values
    return out


def analyse(rows: List[dict], threshold: Optional[float] = None,
            min_depth: int = 128) -> List[dict]:
    """Every run of `min_depth` layers or more, read around its collapse (`threshold`: the
    collapse alarm's default unless given)."""
    if threshold is None:
        threshold = collapse_threshold()
    rows = [r for r in rows if int(r.get("depth", 0)) >= min_depth and r.get("signals")
            and not (r.get("signals") or {}).get("error")]
    reference: Dict[object, List[int]] = {}
    for row in rows:
        it = collapse_iteration(row, threshold)
        if it is not None:
            for key in ((row.get("placement"), row.get("scale_mode")), row.get("scale_mode"),
                        "all"):
                reference.setdefault(key, []).append(it)
    medians = {key: int(median(values)) for key, values in reference.items()}
    out = [run_signals(row, threshold, medians) for row in rows]
    return [r for r in out if r is not None]


# The table: (column title, moment, signal key); medians over the runs of each group.
COLUMNS = (
    ("grad ratio 2/L", "before", "grad_ratio"), ("grad ratio 2/L", "at", "grad_ratio"),
    ("grad ratio 2/L", "end", "grad_ratio"),
    ("update ratio layer 2", "at", "2/update_ratio"),
    ("update ratio layer 2", "end", "2/update_ratio"),
    ("update ratio layer L", "end", "L/update_ratio"),
    ("MLP branch RMS mid", "before", "mid/mlp_rms"), ("MLP branch RMS mid", "at", "mid/mlp_rms"),
    ("attn branch RMS mid", "at", "mid/attention_rms"),
    ("max MLP branch RMS", "at", "max/mlp_rms"), ("max attn branch RMS", "at", "max/attention_rms"),
    ("N2 input RMS (est.) mid", "at", "mid/n2_input_rms_est"),
    ("N2 input RMS (est.) layer 2", "at", "2/n2_input_rms_est"),
    ("MLP branch RMS mid", "end", "mid/mlp_rms"),
)


def _fmt(x) -> str:
    if x is None:
        return ""
    if x == 0:
        return "0"
    return f"{x:.2g}" if abs(x) < 0.01 or abs(x) >= 1000 else f"{x:.3g}"


def group_key(run: dict) -> tuple:
    return (run["placement"], "collapses" if run["collapses"] else "trains")


def table(runs: List[dict]) -> str:
    """Markdown: one line per (placement, collapses or not), medians over its runs."""
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    head = ["placement", "runs", "n", "collapse it. (median)", "valid loss (median)"] + [
        f"{title} [{moment}]" for title, moment, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (placement, kind), members in sorted(groups.items()):
        cells = [placement, kind, str(len(members)),
                 _fmt(_median([m["collapse_iteration"] for m in members])),
                 _fmt(_median([m["final_valid_loss"] for m in members]))]
        for _title, moment, key in COLUMNS:
            cells.append(_fmt(_median([m[moment].get(key) for m in members])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_run_table(runs: List[dict]) -> str:
    keys = (("grad_ratio", "at"), ("2/update_ratio", "end"), ("mid/mlp_rms", "at"),
            ("mid/attention_rms", "at"), ("max/mlp_rms", "at"), ("mid/n2_input_rms_est", "at"))
    head = ["run", "valid loss", "collapse it."] + [f"{k} [{m}]" for k, m in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in sorted(runs, key=lambda r: (r["placement"], not r["collapses"], r["name"])):
        cells = [run["name"], _fmt(run["final_valid_loss"]),
                 str(run["collapse_iteration"] or f"- (read at {run['read_at']['at']})")]
        cells += [_fmt(run[m].get(k)) for k, m in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _median(values) -> Optional[float]:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return median(values) if values else None


def load_rows(path: str) -> List[dict]:
    from spannorm_megatron.lab.grid.results import latest_rows, read_results

    return sorted(latest_rows(read_results(path)).values(), key=lambda r: r.get("index", 0))


def report_markdown(runs: List[dict], threshold: float, level: int = 1) -> str:
    """The tables as Markdown under one heading of `level`."""
    return (f"{'#' * level} Signals around the collapse (threshold: layer-2/L gradient ratio < "
            f"{threshold:g})\n\nMedians per placement and outcome:\n\n{table(runs)}\n"
            f"Per run:\n\n{per_run_table(runs)}")


def write_report(runs: List[dict], out_dir: str, threshold: float) -> List[str]:
    """mechanism.md (the tables) and mechanism.json (every run's signals) in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "mechanism.md"), os.path.join(out_dir, "mechanism.json")]
    with open(paths[0], "w") as f:
        f.write(report_markdown(runs, threshold))
    with open(paths[1], "w") as f:
        json.dump({"threshold": threshold, "runs": runs}, f, indent=1)
    return paths


BEGIN = "<!-- the tables below: examples/depth_sweep/mechanism.py --into (do not edit) -->"
END = "<!-- end of the generated tables -->"


def update_document(path: str, runs: List[dict], threshold: float) -> str:
    """Rewrite the generated tables inside an existing Markdown document, between `BEGIN` and
    `END` (appended at its end the first time), so the document that explains the mechanism
    also carries its current numbers and no second copy is kept beside it."""
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n\n{report_markdown(runs, threshold, level=2)}\n{END}\n"
    if BEGIN in text and END in text:
        start, end = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + block.rstrip("\n") + text[end:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path
