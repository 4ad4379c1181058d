"""Each planned run's spannorm-train flags and the time it is estimated to take; the budget
check that refuses a grid before anything trains."""

from __future__ import annotations

import os
from typing import List, Tuple

from spannorm_megatron.lab.grid.factors import GridError, PlannedRun, Setting
from spannorm_megatron.lab.grid.spec import Grid, resolve


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
    if setting.on_collapse != "warn":
        flags += ["--on-collapse", setting.on_collapse]
    if grid.rms_every or grid.heldout_text:
        # (the last iteration is always saved: the held-out evaluation reads it)
        flags += ["--save", os.path.join(run_dir, "checkpoints"),
                  "--save-interval", str(grid.rms_every or s["train_iters"])]
    return flags

