"""A grid file, read and checked: the base config, budget, corpora, held-out text and groups,
every run planned (nothing is prepared or trained). Bad input raises GridError here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from spannorm_megatron.lab.grid.factors import FACTORS, GridError, PlannedRun, Setting, parse_cell

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def read_yaml(path: str) -> dict:
    import yaml

    from spannorm_megatron.config.yaml_file import load_yaml

    try:
        with open(path) as f:
            data = load_yaml(f) or {}
    except FileNotFoundError:
        raise GridError(f"Grid file '{path}' does not exist.") from None
    except yaml.YAMLError as err:
        raise GridError(f"Grid file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise GridError(f"Grid file '{path}' must be a YAML mapping (base_config, groups, ...).")
    return data


@dataclass
class Grid:
    path: str
    base_config: str
    base: dict                      # the base config's flags, keys with dashes
    budget_hours: float
    max_run_minutes: float
    threads: int
    corpora: Dict[str, str]
    startup_s: float
    step_s_per_layer: float
    tokens_exponent: float
    width_exponent: float
    rms_every: int
    corpus_max_bytes: int
    heldout_text: Optional[str] = None
    """Text file tools/evaluate.py scores each run's final checkpoint on (None: not done)."""
    heldout_max_bytes: int = 0
    heldout_s: float = 20.0
    runs: List[PlannedRun] = field(default_factory=list)
    not_applicable: List[Tuple[PlannedRun, str]] = field(default_factory=list)
    """Cells a placement cannot run (e.g. scale_mode forward with prenorm, which uses
    megatron-core's own layer): left out of the plan, listed by --dry-run and at the start."""

    def base_value(self, key: str, default=None):
        return self.base.get(key, default)


KNOWN_KEYS = {"base_config", "budget_hours", "max_run_minutes", "threads", "corpora",
              "estimate", "rms_every", "groups", "corpus_max_bytes", "heldout"}
GROUP_KEYS = {"name", "placements", "depths", "seeds", "cells"}


def load_grid(path: str) -> Grid:
    """Read and check a grid file; every run is planned (nothing is prepared or trained)."""
    data = read_yaml(path)
    unknown = set(data) - KNOWN_KEYS
    if unknown:
        raise GridError(f"Grid file '{path}': unknown key(s) {', '.join(sorted(unknown))}; the "
                        f"keys are {', '.join(sorted(KNOWN_KEYS))}.")
    here = os.path.dirname(os.path.abspath(path))
    base_config = os.path.join(here, str(data.get("base_config", "config.yaml")))
    if not os.path.isfile(base_config):
        raise GridError(f"Grid file '{path}': base_config '{base_config}' does not exist.")
    base = read_yaml(base_config)
    for key in ("budget_hours", "max_run_minutes"):
        if not isinstance(data.get(key), (int, float)) or data[key] <= 0:
            raise GridError(f"Grid file '{path}' must declare `{key}` (a positive number): the "
                            "grid is refused before anything trains when its estimate exceeds it.")
    corpora = {"stdlib": "embedded"}
    for name, where in (data.get("corpora") or {}).items():
        corpora[str(name)] = str(where)
    estimate = data.get("estimate") or {}
    grid = Grid(
        path=os.path.abspath(path), base_config=base_config, base=base,
        budget_hours=float(data["budget_hours"]),
        max_run_minutes=float(data["max_run_minutes"]),
        threads=int(data.get("threads", 1)), corpora=corpora,
        startup_s=float(estimate.get("startup_s", 25.0)),
        step_s_per_layer=float(estimate.get("step_s_per_layer", 0.0055)),
        tokens_exponent=float(estimate.get("tokens_exponent", 1.0)),
        width_exponent=float(estimate.get("width_exponent", 1.0)),
        rms_every=int(data.get("rms_every", 0)),
        corpus_max_bytes=int(data.get("corpus_max_bytes", 4_000_000)),
        heldout_s=float(estimate.get("heldout_s", 20.0)),
    )
    _read_heldout(grid, data.get("heldout"), path)
    groups = data.get("groups")
    if not isinstance(groups, list) or not groups:
        raise GridError(f"Grid file '{path}' declares no `groups` (a list of placements x depths "
                        "x seeds x cells to run).")
    index = 0
    for g, group in enumerate(groups):
        where = f"{path}: group {g + 1}"
        if not isinstance(group, dict):
            raise GridError(f"{where} must be a mapping with {', '.join(sorted(GROUP_KEYS))}.")
        bad = set(group) - GROUP_KEYS
        if bad:
            raise GridError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; a group has "
                            f"{', '.join(sorted(GROUP_KEYS))} (factors go inside `cells`).")
        name = str(group.get("name", f"group{g + 1}"))
        where = f"{path}: group '{name}'"
        placements = [str(p) for p in group.get("placements") or []]
        depths = [int(d) for d in group.get("depths") or []]
        seeds = [int(s) for s in group.get("seeds") or [int(base.get("seed", 1234))]]
        cells = [parse_cell(c, f"{where}, cell {i + 1}", corpora)
                 for i, c in enumerate(group.get("cells") or [{}])]
        if not placements or not depths:
            raise GridError(f"{where} needs `placements` and `depths`.")
        _check_placements(placements, where)
        for seed in seeds:
            for cell in cells:
                for depth in depths:
                    for placement in placements:
                        setting = Setting(placement=placement, depth=depth, seed=seed)
                        for factor, level in cell.items():
                            setattr(setting, FACTORS[factor].attribute, level)
                        planned = PlannedRun(index, name, dict(cell), setting)
                        index += 1  # stable numbering: left-out cells keep their number
                        reason = _not_applicable(setting)
                        if reason:
                            grid.not_applicable.append((planned, reason))
                        else:
                            grid.runs.append(planned)
    seen = set()
    grid.runs = [r for r in grid.runs if not (r.name in seen or seen.add(r.name))]
    for run in grid.runs:
        _check_run(grid, run)
    return grid


def _read_heldout(grid: Grid, heldout, path: str) -> None:
    """`heldout: {text: FILE, max_bytes: N}`: every run's final checkpoint is scored on FILE
    (its first N bytes; 0: all) by tools/evaluate.py, for bits per byte on text outside the
    training corpus. FILE is relative to the repository root, like the corpora."""
    if heldout is None:
        return
    if not isinstance(heldout, dict) or "text" not in heldout or set(heldout) - {"text",
                                                                                "max_bytes"}:
        raise GridError(f"Grid file '{path}': `heldout` is a mapping {{text: FILE, max_bytes: "
                        f"N}} (max_bytes optional, 0 = the whole file), not {heldout!r}.")
    text = corpus_path(str(heldout["text"]))
    if not os.path.isfile(text):
        raise GridError(f"Grid file '{path}': heldout text '{text}' does not exist.")
    try:
        max_bytes = int(heldout.get("max_bytes", 0))
        if max_bytes < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise GridError(f"Grid file '{path}': heldout max_bytes must be a whole number >= 0, "
                        f"not {heldout.get('max_bytes')!r}.") from None
    grid.heldout_text, grid.heldout_max_bytes = text, max_bytes


def _not_applicable(setting: Setting) -> Optional[str]:
    """Why this placement cannot run this cell at all (None: it can)."""
    if setting.scale_mode == "forward":
        from spannorm_megatron.placements import get_placement

        if not get_placement(setting.placement).supports_forward_scaling:
            return (f"scale_mode forward is not available for {setting.placement} (it uses "
                    "megatron-core's own layer)")
    return None


def _check_placements(placements: Sequence[str], where: str) -> None:
    try:
        from spannorm_megatron.placements import PLACEMENTS
    except ImportError:  # pragma: no cover
        return
    known = set(PLACEMENTS)
    bad = [p for p in placements if p not in known]
    if bad:
        raise GridError(f"{where}: unknown placement(s) {', '.join(bad)}; registered: "
                        f"{', '.join(sorted(known))}.")


def _check_run(grid: Grid, run: PlannedRun) -> None:
    s = resolve(grid, run.setting)
    seq = int(grid.base_value("seq-length", 64))
    if s["tokens_per_step"] % seq:
        raise GridError(f"Run {run.name}: tokens_per_step {s['tokens_per_step']} is not a "
                        f"multiple of the base seq-length {seq}.")
    heads = int(grid.base_value("num-attention-heads", 4))
    if s["width"] % heads:
        raise GridError(f"Run {run.name}: width {s['width']} is not a multiple of the "
                        f"{heads} attention heads.")
    if s["warmup"] >= s["train_iters"]:
        raise GridError(f"Run {run.name}: warm-up {s['warmup']} is not shorter than the run "
                        f"({s['train_iters']} iterations).")



def resolve(grid: Grid, setting: Setting) -> dict:
    """The run's effective numbers (base config where the cell leaves them)."""
    base_width = int(grid.base_value("hidden-size", 64))
    width = setting.width or base_width
    base_ffn = int(grid.base_value("ffn-hidden-size", 4 * base_width))
    ffn = base_ffn if width == base_width else int(round(base_ffn * width / base_width / 16) * 16)
    seq = int(grid.base_value("seq-length", 64))
    gbs = int(grid.base_value("global-batch-size", grid.base_value("micro-batch-size", 4)))
    lr = setting.lr if setting.lr is not None else float(grid.base_value("lr", 2e-3))
    base_lr = float(grid.base_value("lr", 2e-3))
    min_lr = float(grid.base_value("min-lr", 0.1 * base_lr)) * (lr / base_lr)
    return {
        "placement": setting.placement, "depth": setting.depth, "seed": setting.seed,
        "corpus": setting.corpus, "tokenizer": setting.tokenizer,
        "scale_mode": setting.scale_mode, "scale_init": setting.scale_init,
        "lr": lr, "min_lr": min_lr,
        "warmup": setting.warmup if setting.warmup is not None
        else int(grid.base_value("lr-warmup-iters", 0)),
        "tokens_per_step": setting.tokens_per_step or gbs * seq,
        "seq_length": seq,
        "train_iters": setting.train_iters or int(grid.base_value("train-iters", 200)),
        "width": width, "ffn": ffn, "embeddings": setting.embeddings,
    }



def corpus_path(source: str) -> str:
    return source if os.path.isabs(source) else os.path.normpath(os.path.join(ROOT, source))

