"""The depth sweep's grid mode: a declared list of factor cells, each varied alone from the
sweep's base setting, trained one run at a time with `spannorm-train`, unattended and resumable,
into one results table.

A grid file (YAML, `examples/depth_sweep/grid.yaml` is the one issue 16 needs):

    base_config: config.yaml        # the sweep's spannorm-train flags (relative to this file)
    budget_hours: 40                # the whole grid must be estimated to fit, or nothing runs
    max_run_minutes: 5              # and so must every single run
    threads: 1                      # OMP/torch threads per run
    corpora:                        # corpus name -> `embedded` or a text file (never copied)
      stdlib: embedded
      shakespeare: ../shared/data/tinyshakespeare.txt    # relative to the repository root
    estimate: {startup_s: 30, step_s_per_layer: 0.0055}  # the time model, see estimate_seconds
    rms_every: 20                   # output-projection RMS every N iterations (0: not recorded)
    heldout: {text: ../shared/data/wikitext2-valid.txt, max_bytes: 16384}
                                    # tools/evaluate.py on the final checkpoint (optional)
    groups:                         # run in this order
      - name: decisive
        placements: [spannorm, prenorm, postnorm]
        depths: [128]
        seeds: [1234, 1235, 1236]
        cells: [{}, {tokenizer: bytes}, {scale_mode: forward}]   # {} = the base setting

A cell maps factor names (`FACTORS`) to levels; everything it does not name stays at the base
setting (the base config, the `stdlib` corpus, SentencePiece 4096 trained on the run's corpus,
`--scale-mode init`, each placement's default `--scale-init`, untied embeddings). Within a group
the order is seed, then cell, then placement, so a grid stopped early has every cell at its
first seed.

Output under OUT (default runs/grid):

    OUT/data/                    prepared corpora, tokenizers and indexed datasets (reused)
    OUT/runs/<name>/             train.log, tensorboard/, run.txt (as examples/depth_sweep/run.sh),
                                 heldout.json / heldout.log (with `heldout`)
    OUT/results.jsonl            one JSON object per finished run, appended when it finishes
    OUT/results.csv              the same rows (without histories) in grid order, rewritten
    OUT/grid.txt                 the grid file and the command, for the record

A run counts as finished when its row is in results.jsonl; an interrupted grid started again
skips those and trains the rest (a run that was cut off is started over). `--retry-failed`
also trains runs whose process failed.

Bad input -- an unknown factor or level, a grid estimated to take longer than `budget_hours`,
a run estimated over `max_run_minutes`, a missing corpus file -- raises GridError before any
data is prepared or any run trains.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import gzip
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from spannorm_megatron.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GridError(UserError):
    """A grid file that cannot run as declared (named factor, level or budget, and the fix)."""


# ---------------------------------------------------------------------------------------------
# The base setting and the factors


@dataclass
class Setting:
    """What one run trains with (flags derived from it in `train_flags`)."""

    placement: str
    depth: int
    seed: int
    corpus: str = "stdlib"
    tokenizer: str = "sp4096"
    scale_mode: str = "init"
    scale_init: str = "default"
    lr: Optional[float] = None              # None: the base config's
    warmup: Optional[int] = None
    tokens_per_step: Optional[int] = None
    train_iters: Optional[int] = None
    width: Optional[int] = None
    embeddings: str = "untied"              # spannorm-train's default


def _number(kind: type) -> Callable[[object], object]:
    def parse(level):
        try:
            value = kind(level)
        except (TypeError, ValueError):
            raise ValueError(f"not a {kind.__name__}") from None
        if value <= 0:
            raise ValueError("must be positive")
        return value
    return parse


def _choice(*choices: str) -> Callable[[object], object]:
    def parse(level):
        if str(level) not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return str(level)
    return parse


def _tokenizer_level(level):
    text = str(level)
    if text == "bytes" or re.fullmatch(r"sp\d+", text):
        return text
    raise ValueError("`bytes` (ByteLevelTokenizer) or `sp<N>` (SentencePiece, vocabulary N, "
                     "trained on the run's corpus), e.g. sp4096")


def _scale_init_level(level):
    text = str(level)
    if text in ("default", "sqrt_depth", "megatron", "none"):
        return text
    try:
        if float(text) > 0:
            return text
    except ValueError:
        pass
    raise ValueError("default, sqrt_depth, megatron, none or a positive number")


@dataclass(frozen=True)
class Factor:
    name: str
    attribute: str
    parse: Callable[[object], object]
    help: str


FACTORS: Dict[str, Factor] = {f.name: f for f in (
    Factor("corpus", "corpus", str, "a name under `corpora` (stdlib = the quickstart's corpus)"),
    Factor("tokenizer", "tokenizer", _tokenizer_level,
           "bytes (ByteLevelTokenizer, vocabulary 257) or sp<N> (SentencePiece N, base sp4096)"),
    Factor("scale_mode", "scale_mode", _choice("init", "forward"), "--scale-mode"),
    Factor("scale_init", "scale_init", _scale_init_level, "--scale-init (default: placement's)"),
    Factor("lr", "lr", _number(float), "peak --lr (--min-lr follows at 10% of it)"),
    Factor("warmup", "warmup", _number(int), "--lr-warmup-iters"),
    Factor("tokens_per_step", "tokens_per_step", _number(int),
           "tokens per optimizer step (global batch = tokens / seq-length, one micro-batch)"),
    Factor("train_iters", "train_iters", _number(int), "run length, --train-iters"),
    Factor("width", "width", _number(int),
           "--hidden-size (heads fixed, --ffn-hidden-size scaled with it)"),
    Factor("embeddings", "embeddings", _choice("tied", "untied"),
           "tied = --no-untie-embeddings-and-output-weights (the base is untied)"),
)}


def parse_cell(cell, where: str, corpora: Dict[str, str]) -> Dict[str, object]:
    """{factor: level} of one declared cell, checked (GridError names the cell and the fix)."""
    if cell is None:
        return {}
    if not isinstance(cell, dict):
        raise GridError(f"{where}: a cell is a mapping of factor names to levels (e.g. "
                        f"{{tokenizer: bytes}}, or {{}} for the base setting), not {cell!r}.")
    parsed = {}
    for name, level in cell.items():
        factor = FACTORS.get(name)
        if factor is None:
            raise GridError(
                f"{where}: unknown factor '{name}'. The factors are: "
                + "; ".join(f"{f.name} ({f.help})" for f in FACTORS.values())
                + ". (placement, depth and seed are a group's placements/depths/seeds.)")
        try:
            value = factor.parse(level)
        except ValueError as err:
            raise GridError(f"{where}: factor '{name}' has no level {level!r}: it takes "
                            f"{err}.") from None
        if name == "corpus" and value not in corpora:
            raise GridError(f"{where}: corpus '{value}' is not declared under `corpora` (known: "
                            f"{', '.join(sorted(corpora)) or 'none'}); add `{value}: PATH`.")
        parsed[name] = value
    return parsed


def cell_label(cell: Dict[str, object]) -> str:
    if not cell:
        return "base"
    return "+".join(f"{name}={level}" for name, level in cell.items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


@dataclass
class PlannedRun:
    index: int
    group: str
    cell: Dict[str, object]
    setting: Setting

    @property
    def name(self) -> str:
        s = self.setting
        cell = "base" if not self.cell else "_".join(
            f"{_slug(k)}-{_slug(str(v))}" for k, v in self.cell.items())
        return f"{s.placement}_L{s.depth}_s{s.seed}_{cell}"


# ---------------------------------------------------------------------------------------------
# The grid file


def read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
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
    text = _corpus_path(str(heldout["text"]))
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


# ---------------------------------------------------------------------------------------------
# Effective settings, flags and the time estimate


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


def estimate_seconds(grid: Grid, setting: Setting, heldout: bool = True) -> float:
    """startup + steps x step time, where a step costs `step_s_per_layer` x layers at the base
    width and tokens per step, times (tokens / base) ** tokens_exponent and (width / base) **
    width_exponent (1 = linear; tiny models on CPU scale less than linearly); an evaluation batch
    counts as a third of a step, a checkpoint save (for the projection RMS) as one step, the
    held-out evaluation (when declared and `heldout`) as `estimate.heldout_s`."""
    s = resolve(grid, setting)
    base_tokens = int(grid.base_value("global-batch-size", 4)) * s["seq_length"]
    base_width = int(grid.base_value("hidden-size", 64))
    step = (grid.step_s_per_layer * s["depth"]
            * (s["tokens_per_step"] / base_tokens) ** grid.tokens_exponent
            * (s["width"] / base_width) ** grid.width_exponent)
    eval_interval = int(grid.base_value("eval-interval", 50))
    evals = s["train_iters"] // max(1, eval_interval) + 1
    eval_steps = evals * int(grid.base_value("eval-iters", 8)) / 3
    saves = s["train_iters"] // grid.rms_every if grid.rms_every else 0
    extra = grid.heldout_s if grid.heldout_text and heldout else 0.0
    return grid.startup_s + step * (s["train_iters"] + eval_steps + saves) + extra


def check_budget(grid: Grid) -> Tuple[float, List[Tuple[PlannedRun, float]]]:
    """Total estimated seconds; GridError when a run exceeds max_run_minutes or the grid its
    budget_hours."""
    estimates = [(run, estimate_seconds(grid, run.setting)) for run in grid.runs]
    # max_run_minutes bounds the training run; the held-out evaluation after it counts in the
    # grid's budget only
    over = [(run, estimate_seconds(grid, run.setting, heldout=False)) for run in grid.runs]
    over = [(run, sec) for run, sec in over if sec > 60 * grid.max_run_minutes]
    if over:
        run, sec = over[0]
        raise GridError(
            f"Grid '{grid.path}': run {run.name} is estimated at {sec / 60:.1f} min, over the "
            f"declared max_run_minutes {grid.max_run_minutes:g} ({len(over)} run(s) over). "
            "Shorten it (train_iters, tokens_per_step, width) or raise max_run_minutes.")
    total = sum(sec for _, sec in estimates)
    if total > 3600 * grid.budget_hours:
        raise GridError(
            f"Grid '{grid.path}' is estimated at {total / 3600:.1f} h for {len(estimates)} runs, "
            f"over its declared budget_hours {grid.budget_hours:g}. Drop cells, seeds or depths, "
            "or raise budget_hours. (Estimate: startup_s + step_s_per_layer x layers per step, "
            "from the grid file's `estimate`.)")
    return total, estimates


def dataset_key(setting: Setting) -> str:
    return f"{setting.corpus}_{setting.tokenizer}"


def train_flags(grid: Grid, run: PlannedRun, data_dir: str, run_dir: str) -> List[str]:
    s = resolve(grid, run.setting)
    key = dataset_key(run.setting)
    flags = ["--config", grid.base_config,
             "--norm-placement", s["placement"], "--num-layers", str(s["depth"]),
             "--seed", str(s["seed"]),
             "--data-path", os.path.join(data_dir, f"{key}_text_document"),
             "--tensorboard-dir", os.path.join(run_dir, "tensorboard")]
    if s["tokenizer"] == "bytes":
        flags += ["--tokenizer-type", "ByteLevelTokenizer"]
    else:
        flags += ["--tokenizer-type", "SentencePieceTokenizer",
                  "--tokenizer-model", os.path.join(data_dir, f"{key}.model")]
    setting = run.setting
    if setting.scale_mode != "init":
        flags += ["--scale-mode", setting.scale_mode]
    if setting.scale_init != "default":
        flags += ["--scale-init", setting.scale_init]
    if setting.lr is not None:
        flags += ["--lr", repr(s["lr"]), "--min-lr", repr(s["min_lr"])]
    if setting.warmup is not None:
        flags += ["--lr-warmup-iters", str(s["warmup"])]
    if setting.tokens_per_step is not None:
        batch = s["tokens_per_step"] // s["seq_length"]
        flags += ["--global-batch-size", str(batch), "--micro-batch-size", str(batch)]
    if setting.train_iters is not None:
        flags += ["--train-iters", str(s["train_iters"])]
    if setting.width is not None:
        flags += ["--hidden-size", str(s["width"]), "--ffn-hidden-size", str(s["ffn"])]
    if setting.embeddings == "tied":
        flags += ["--no-untie-embeddings-and-output-weights"]
    if grid.rms_every or grid.heldout_text:
        # (the last iteration is always saved: the held-out evaluation reads it)
        flags += ["--save", os.path.join(run_dir, "checkpoints"),
                  "--save-interval", str(grid.rms_every or s["train_iters"])]
    return flags


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(grid: Grid, data_dir: str, keys: Sequence[Tuple[str, str]], python: str,
                 log=print) -> Dict[str, dict]:
    """Corpus -> (SentencePiece model) -> indexed dataset for every (corpus, tokenizer) pair;
    each step is skipped when its output exists. Returns {key: info} with bytes per token."""
    os.makedirs(data_dir, exist_ok=True)
    infos = {}
    for corpus, tokenizer in keys:
        key = f"{corpus}_{tokenizer}"
        info_path = os.path.join(data_dir, f"{key}.json")
        if os.path.isfile(info_path) and os.path.isfile(
                os.path.join(data_dir, f"{key}_text_document.idx")):
            with open(info_path) as f:
                infos[key] = json.load(f)
            continue
        source = grid.corpora[corpus]
        if source == "embedded":
            text_input = os.path.join(data_dir, f"{corpus}.jsonl")
            if not os.path.isfile(text_input):
                log(f"== data: writing the embedded corpus ({grid.corpus_max_bytes} bytes) -> "
                    f"{text_input}")
                _call([python, "-m", "spannorm_megatron.data.corpus", "--max-bytes",
                       str(grid.corpus_max_bytes), text_input])
            input_format = "jsonl"
        else:
            text_input = _corpus_path(source)
            input_format = "text"
        flags = []
        if tokenizer == "bytes":
            flags = ["--tokenizer-type", "ByteLevelTokenizer"]
        else:
            model_prefix = os.path.join(data_dir, key)
            if not os.path.isfile(model_prefix + ".model"):
                log(f"== data: training SentencePiece {tokenizer} on {corpus}")
                _call([python, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                       text_input, "--model-prefix", model_prefix, "--vocab-size",
                       tokenizer[2:]])
            flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                     model_prefix + ".model"]
        log(f"== data: preprocessing {corpus} with {tokenizer}")
        _call([python, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", text_input,
               "--input-format", input_format, "--output-prefix", os.path.join(data_dir, key),
               "--append-eod", "--workers", "1"] + flags)
        infos[key] = _dataset_info(text_input, input_format,
                                   os.path.join(data_dir, f"{key}_text_document"))
        with open(info_path, "w") as f:
            json.dump(infos[key], f, indent=1)
    return infos


def _corpus_path(source: str) -> str:
    return source if os.path.isabs(source) else os.path.normpath(os.path.join(ROOT, source))


def _dataset_info(text_input: str, input_format: str, prefix: str) -> dict:
    """UTF-8 bytes of the text, tokens of the dataset (EOD included): bytes per token, which turns
    a loss per token into one per byte (corpus average)."""
    from spannorm_megatron.data.indexed import check_indexed_dataset

    nbytes = 0
    if input_format == "jsonl":
        with open(text_input) as f:
            for line in f:
                if line.strip():
                    nbytes += len(json.loads(line).get("text", "").encode("utf-8"))
    else:
        nbytes = os.path.getsize(text_input)
    tokens = check_indexed_dataset(prefix).num_tokens
    return {"text": text_input, "bytes": nbytes, "tokens": tokens,
            "bytes_per_token": nbytes / tokens if tokens else None}


def _child_env(**extra) -> Dict[str, str]:
    """The children import this checkout's package, whatever an editable install points at."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""), **extra)


def _call(command: List[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=_child_env())
    if result.returncode != 0:
        raise GridError(f"Data preparation failed: {shlex.join(command)}\n"
                        f"{(result.stderr or result.stdout).strip()[-2000:]}")


# ---------------------------------------------------------------------------------------------
# One run and its row


def projection_rms(checkpoint_dir: str) -> dict:
    """RMS of the output projections (attention linear_proj, MLP linear_fc2) in every saved
    iteration under `checkpoint_dir`: mean, min and max over layers, and layer 1's and layer L's."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    names = {"attn": "decoder.layers.self_attention.linear_proj.weight",
             "fc2": "decoder.layers.mlp.linear_fc2.weight"}
    out = {"iterations": []}
    for entry in sorted(os.listdir(checkpoint_dir)):
        match = re.fullmatch(r"iter_(\d+)", entry)
        if not match:
            continue
        path = os.path.join(checkpoint_dir, entry)
        meta = FileSystemReader(path).read_metadata().state_dict_metadata
        # Host memory on purpose: an offline read of saved weights, no collective, no model.
        state = {key: torch.empty(meta[key].size, dtype=meta[key].properties.dtype)
                 for key in names.values() if key in meta}
        if len(state) != len(names):
            continue
        dcp.load(state, checkpoint_id=path,
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        out["iterations"].append(int(match.group(1)))
        for short, key in names.items():
            weight = state[key].float()
            per_layer = weight.pow(2).mean(dim=tuple(range(1, weight.dim()))).sqrt().tolist()
            for stat, value in (("mean", sum(per_layer) / len(per_layer)),
                                ("min", min(per_layer)), ("max", max(per_layer)),
                                ("first", per_layer[0]), ("last", per_layer[-1])):
                out.setdefault(f"{short}_{stat}", []).append(value)
    return out


SIGNAL_LAYERS = ("1", "2", "mid", "L")


def read_signals(tb_dir: str, depth: int) -> dict:
    """The per-layer stability signals spannorm-train logged to TensorBoard
    (`stability/layer_NNN/{output_rms,attention_rms,mlp_rms,grad_norm,update_ratio}`, every
    logging step) for layers 1, 2, L/2 and L, plus the maxima over layers, the embedding's and
    output layer's grad_norm / update_ratio and the global `grad-norm` (as total/grad_norm):
    {"iterations": [...], "<layer>/<signal>": [...]} (empty without the tags). What the
    mechanism needs around a collapse, kept in the results table so it outlives runs/."""
    if not os.path.isdir(tb_dir) or depth < 1:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    layers = {"1": 1, "2": min(2, depth), "mid": max(1, depth // 2), "L": depth}
    series = {}
    for label, layer in layers.items():
        prefix = f"stability/layer_{layer:03d}/"
        for tag in sorted(t for t in tags if t.startswith(prefix)):
            series[f"{label}/{tag[len(prefix):]}"] = {
                int(e.step): float(e.value) for e in acc.Scalars(tag)}
    for tag in sorted(t for t in tags if t.startswith("stability/max/")):
        series[f"max/{tag[len('stability/max/'):]}"] = {
            int(e.step): float(e.value) for e in acc.Scalars(tag)}
    # The parts outside the layers, and the global norm they are a share of (runs from
    # 2026-12-07 on).
    for part in ("embedding", "output_layer"):
        for tag in sorted(t for t in tags if t.startswith(f"stability/{part}/")):
            series[f"{part}/{tag.rsplit('/', 1)[1]}"] = {
                int(e.step): float(e.value) for e in acc.Scalars(tag)}
    if not series:
        return {}
    steps = sorted(set().union(*(set(v) for v in series.values())))
    if "grad-norm" in tags:
        # Written every --tensorboard-log-interval (default: every iteration); kept at the
        # logging steps of the signals it is compared with.
        series["total/grad_norm"] = {int(e.step): float(e.value)
                                     for e in acc.Scalars("grad-norm") if int(e.step) in steps}
    out = {"iterations": steps}
    for key, values in series.items():
        out[key] = [values.get(i) for i in steps]
    return out


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


def run_one(grid: Grid, run: PlannedRun, out_dir: str, data_infos: Dict[str, dict],
            python: str, keep_checkpoints: bool = False, log=print) -> dict:
    from spannorm_megatron.lab.sweep import load_run

    run_dir = os.path.join(out_dir, "runs", run.name)
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    data_dir = os.path.join(out_dir, "data")
    flags = train_flags(grid, run, data_dir, run_dir)
    command = [python, "-m", "spannorm_megatron.train"] + flags
    env = _child_env(OMP_NUM_THREADS=str(grid.threads), MKL_NUM_THREADS=str(grid.threads))
    s = resolve(grid, run.setting)
    start = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as logfile:
        logfile.write(f"# {shlex.join(command)}\n")
        logfile.flush()
        code = _call_run(command, logfile, env)
    seconds = time.time() - start
    with open(os.path.join(run_dir, "run.txt"), "w") as f:
        f.write(f"placement={s['placement']}\ndepth={s['depth']}\nscale_init={s['scale_init']}\n"
                f"nproc=1\ntrain_iters={s['train_iters']}\nexit_code={code}\n"
                f"seconds={seconds:.1f}\n")
    swept = load_run(run_dir)
    v = swept.verdict
    rms, heldout = {}, {}
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(checkpoints):
        try:
            rms = projection_rms(checkpoints)
        except Exception as err:  # the row is still worth writing
            rms = {"error": f"{type(err).__name__}: {err}"}
        if grid.heldout_text and code == 0:
            heldout = evaluate_heldout(grid, checkpoints, run_dir, python, env)
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    info = data_infos.get(dataset_key(run.setting), {})
    bpt = info.get("bytes_per_token")
    bits = (v.final_valid_loss / bpt / math.log(2)
            if v.final_valid_loss is not None and bpt and math.isfinite(v.final_valid_loss)
            else None)
    vocab = re.search(r"vocab (\d+)", _read(os.path.join(run_dir, "train.log")))

    def pick(key, at):
        values = rms.get(key) or []
        return values[at] if values else None

    row = {
        "index": run.index, "name": run.name, "group": run.group, "cell": cell_label(run.cell),
        "placement": s["placement"], "depth": s["depth"], "seed": s["seed"],
        "corpus": s["corpus"], "tokenizer": s["tokenizer"],
        "vocab_size": 257 if s["tokenizer"] == "bytes" else int(s["tokenizer"][2:]),
        "padded_vocab_size": int(vocab.group(1)) if vocab else None,
        "scale_mode": s["scale_mode"], "scale_init": s["scale_init"], "lr": s["lr"],
        "warmup": s["warmup"], "tokens_per_step": s["tokens_per_step"],
        "train_iters": s["train_iters"], "width": s["width"], "embeddings": s["embeddings"],
        "status": swept.status, "exit_code": code, "start_loss": v.start_loss,
        "final_train_loss": v.final_train_loss, "min_train_loss": v.min_train_loss,
        "final_valid_loss": v.final_valid_loss, "valid_bits_per_byte": bits,
        "heldout_bits_per_byte": heldout.get("bits_per_byte"),
        "heldout_loss": heldout.get("loss"),
        "diverged": v.diverged, "layer_grad_ratio_min": swept.ratio_min,
        "layer_grad_ratio_final": swept.ratio_final, "max_grad_norm": v.max_grad_norm,
        "final_grad_norm": v.final_grad_norm,
        "proj_rms_attn_first_saved": pick("attn_mean", 0), "proj_rms_attn_final": pick("attn_mean", -1),
        "proj_rms_fc2_first_saved": pick("fc2_mean", 0), "proj_rms_fc2_final": pick("fc2_mean", -1),
        "init_method_std": float(grid.base_value("init-method-std", 0.02)),
        "seconds": round(seconds, 1), "estimated_seconds": round(estimate_seconds(grid, run.setting), 1),
        "median_step_ms": v.median_step_ms,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        # not in the CSV: histories for the mechanism and the figures
        "bytes_per_token": bpt, "command": shlex.join(command),
        "history": {"iterations": swept.history.iterations,
                    "train_loss": swept.history.train_loss,
                    "grad_norm": swept.history.grad_norm,
                    "valid_iterations": swept.history.valid_iterations,
                    "valid_loss": swept.history.valid_loss,
                    "ratio_iterations": swept.ratio_iterations,
                    "layer_grad_ratio": swept.layer_grad_ratio},
        "projection_rms": rms,
        "heldout": heldout,
        "signals": _signals_or_error(os.path.join(run_dir, "tensorboard"), s["depth"]),
    }
    return row


def evaluate_heldout(grid: Grid, checkpoints: str, run_dir: str, python: str,
                     env: Dict[str, str]) -> dict:
    """tools/evaluate.py on the run's last checkpoint and the grid's held-out text: its JSON
    (loss, perplexity, bits_per_byte, tokens, bytes, ...), or {"error": ...}; the tool's output
    goes to run_dir/heldout.log."""
    out = os.path.join(run_dir, "heldout.json")
    command = [python, os.path.join(ROOT, "tools", "evaluate.py"), "--load", checkpoints,
               "--input", grid.heldout_text, "--max-bytes", str(grid.heldout_max_bytes),
               "--json", out]
    with open(os.path.join(run_dir, "heldout.log"), "w") as logfile:
        logfile.write(f"# {shlex.join(command)}\n")
        logfile.flush()
        code = _call_run(command, logfile, env)  # a SIGTERM to the grid stops it too
    if code != 0 or not os.path.isfile(out):
        return {"error": f"tools/evaluate.py exited with {code} (see heldout.log)"}
    with open(out) as f:
        result = json.load(f)
    return {k: result.get(k) for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes",
                                       "input", "seconds")}


def _signals_or_error(tb_dir: str, depth: int) -> dict:
    try:
        return read_signals(tb_dir, depth)
    except Exception as err:  # the row is still worth writing
        return {"error": f"{type(err).__name__}: {err}"}


def _call_run(command: List[str], logfile, env: Dict[str, str]) -> int:
    """Run one training process; a SIGTERM/SIGINT to the grid stops it too (so no orphan keeps
    writing into a run directory the resumed grid will start over) and ends the grid."""
    import signal

    child = subprocess.Popen(command, cwd=ROOT, stdout=logfile, stderr=subprocess.STDOUT,
                             env=env)

    stopped = []

    def stop(signum, frame):
        # No waiting here: the main thread is inside child.wait(), which holds Popen's lock.
        stopped.append(signum)
        child.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            code = child.wait(timeout=None)
        except BaseException:
            child.kill()
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        raise SystemExit(128 + stopped[0])
    return code


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# The results table


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


def _collapse_threshold() -> float:
    """The collapse alarm's default (--collapse-grad-ratio), so the grid counts collapses as a
    training run would warn about them."""
    from spannorm_megatron.config.logging import LoggingConfig

    return LoggingConfig().collapse_grad_ratio


def summarize_by_setting(rows: List[dict]) -> str:
    """Markdown: one line per setting (cell x depth x placement) over every seed that ran it, in
    whichever group (a cell's seed 1234 in `factors` and its seeds 1235/1236 in `confirm` are one
    setting): n, validation loss mean / sd / min / max, collapses (runs whose layer-2/L gradient
    ratio fell below the collapse alarm's threshold) and held-out bits per byte."""
    from statistics import mean, pstdev

    threshold = _collapse_threshold()
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


# ---------------------------------------------------------------------------------------------
# The command


def run_grid(grid_path: str, out_dir: str, *, python: str = sys.executable,
             dry_run: bool = False, retry_failed: bool = False, max_runs: Optional[int] = None,
             keep_checkpoints: bool = False, groups: Optional[Sequence[str]] = None,
             log=print) -> List[dict]:
    """Run (or resume) the grid's runs not yet in `out_dir`'s table; `groups` keeps only the
    runs of those groups (e.g. to share a grid between two workers, each with its own
    `out_dir`, whose tables `export_results` merges)."""
    grid = load_grid(grid_path)                  # unknown factors/levels: GridError here
    total, estimates = check_budget(grid)        # over budget: GridError here
    if groups:
        known = list(dict.fromkeys(r.group for r in grid.runs))
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise GridError(f"--groups {' '.join(unknown)}: no such group in {grid.path}; its "
                            f"groups are {', '.join(known)}.")
        estimates = [(run, sec) for run, sec in estimates if run.group in groups]
    out_dir = os.path.abspath(out_dir)
    results_path = os.path.join(out_dir, "results.jsonl")
    done_rows = latest_rows(read_results(results_path))

    def finished(row: Optional[dict]) -> bool:
        return row is not None and not (retry_failed and str(row.get("status")).startswith("failed"))

    todo = [(run, sec) for run, sec in estimates if not finished(done_rows.get(run.name))]
    chosen = f" ({len(estimates)} in groups {', '.join(groups)})" if groups else ""
    log(f"grid {grid.path}: {len(grid.runs)} runs{chosen}, estimated {total / 3600:.2f} h "
        f"(budget {grid.budget_hours:g} h); {len(estimates) - len(todo)} finished earlier, "
        f"{len(todo)} to run (~{sum(s for _, s in todo) / 3600:.2f} h)")
    for run, reason in grid.not_applicable:
        log(f"  left out: {run.name}: {reason}")
    if dry_run:
        for run, sec in estimates:
            mark = "done" if finished(done_rows.get(run.name)) else "todo"
            log(f"  [{run.index + 1:3d}] {mark} ~{sec / 60:4.1f} min  {run.group:10s} {run.name}")
        return []
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "grid.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise GridError(f"Another grid is running in {out_dir} (grid.lock is held); wait for it "
                        "or choose another --out.") from None
    with open(os.path.join(out_dir, "grid.txt"), "a") as f:
        f.write(f"started={datetime.datetime.now(datetime.timezone.utc).isoformat()} "
                f"grid={grid.path} pid={os.getpid()} command={shlex.join(sys.argv)}\n")
    keys = list(dict.fromkeys((r.setting.corpus, r.setting.tokenizer) for r, _ in todo))
    infos = prepare_data(grid, os.path.join(out_dir, "data"), keys, python, log=log)
    new_rows = []
    for n, (run, sec) in enumerate(todo):
        if max_runs is not None and n >= max_runs:
            break
        position = grid.runs.index(run) + 1
        log(f"== [{position}/{len(grid.runs)}] {run.name} (~{sec / 60:.1f} min; "
            f"{len(todo) - n - 1} more after it)")
        row = run_one(grid, run, out_dir, infos, python, keep_checkpoints, log=log)
        append_result(results_path, row)
        all_rows = read_results(results_path)
        write_csv(os.path.join(out_dir, "results.csv"), all_rows)
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(summarize(all_rows))
        new_rows.append(row)
        log(f"   {row['status']} after {row['seconds']:.0f}s: train {row['final_train_loss']}, "
            f"valid {row['final_valid_loss']}, min layer-2/L grad ratio "
            f"{row['layer_grad_ratio_min']}")
    return new_rows


EXPORTED_RESULTS = "results.jsonl.gz"


def export_results(out_dirs: Union[str, Sequence[str]], target: str) -> List[str]:
    """The tables of one or several grid output directories (workers that ran different
    groups), merged, as results.jsonl / results.csv / summary.md and the figures in `target`."""
    out_dirs = [out_dirs] if isinstance(out_dirs, str) else list(out_dirs)
    rows, where = [], {}
    for out_dir in out_dirs:
        for row in read_results(os.path.join(out_dir, "results.jsonl")):
            rows.append(row)
            where[row["name"]] = out_dir
    os.makedirs(target, exist_ok=True)
    latest = sorted(latest_rows(rows).values(), key=lambda r: r.get("index", 0))
    # Compressed: with every run's signal histories the table is megabytes of text.
    with gzip.open(os.path.join(target, EXPORTED_RESULTS), "wt") as f:
        for row in latest:
            if "signals" not in row:  # rows from before the signals were kept: read them now
                row = dict(row, signals=_signals_or_error(os.path.join(
                    where[row["name"]], "runs", row["name"], "tensorboard"), int(row["depth"])))
            f.write(json.dumps(_clean(with_derived(row))) + "\n")
    write_csv(os.path.join(target, "results.csv"), rows)
    with open(os.path.join(target, "summary.md"), "w") as f:
        f.write("# Every setting, pooled over the groups that ran it\n\n"
                + summarize_by_setting(rows) + "\n# Per group\n\n" + summarize(rows))
    from spannorm_megatron.lab.grid_plots import plot_grid

    figures = plot_grid([with_derived(r) for r in latest], target)
    return [os.path.join(target, n) for n in (EXPORTED_RESULTS, "results.csv", "summary.md")] + \
        figures


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=os.path.join(ROOT, "examples", "depth_sweep", "grid.yaml"),
                   help="grid file (default: examples/depth_sweep/grid.yaml)")
    p.add_argument("--out", nargs="+", default=[os.path.join(ROOT, "runs", "grid")],
                   help="output directory (default: runs/grid); rerun with the same --out to "
                        "resume. With --summary / --export, several directories (workers that "
                        "ran different --groups) are merged")
    p.add_argument("--dry-run", action="store_true",
                   help="check the grid and print the plan with estimates; train nothing")
    p.add_argument("--retry-failed", action="store_true",
                   help="train again runs whose process failed (finished runs are kept)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after N runs")
    p.add_argument("--groups", nargs="+", default=None, metavar="NAME",
                   help="run only these groups of the grid file (e.g. a second worker with its "
                        "own --out; --export merges the tables)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the checkpoints saved for the projection RMS")
    p.add_argument("--summary", action="store_true",
                   help="print the summary table of --out's results and exit")
    p.add_argument("--export", metavar="DIR", default=None,
                   help="write --out's results (results.jsonl.gz, results.csv, summary.md and the "
                        "figures of lab/grid_plots.py) into DIR and exit, e.g. to keep a "
                        "snapshot of a running grid")
    args = p.parse_args(argv)
    if args.summary:
        rows = [r for out in args.out for r in read_results(os.path.join(out, "results.jsonl"))]
        print(summarize_by_setting(rows) + "\n" + summarize(rows), end="")
        return 0
    if args.export:
        export_results(args.out, args.export)
        return 0
    if len(args.out) > 1:
        print("error: a grid runs into one --out; several are for --summary / --export.",
              file=sys.stderr)
        return 2
    try:
        run_grid(args.grid, args.out[0], dry_run=args.dry_run, retry_failed=args.retry_failed,
                 max_runs=args.max_runs, keep_checkpoints=args.keep_checkpoints,
                 groups=args.groups,
                 log=lambda m: print(m, flush=True))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
