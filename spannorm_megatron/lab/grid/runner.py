"""Training the grid: one run (spannorm-train as a child process, then its row) and the whole
grid, resumable, one run at a time into OUT/results.jsonl."""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from spannorm_megatron.lab.grid.data import child_env, prepare_data
from spannorm_megatron.lab.grid.factors import GridError, PlannedRun, cell_label
from spannorm_megatron.lab.grid.plan import check_budget, dataset_key, estimate_seconds, train_flags
from spannorm_megatron.lab.grid.results import (
    append_result,
    latest_rows,
    read_results,
    summarize,
    write_csv,
)
from spannorm_megatron.lab.grid.signals import projection_rms, signals_or_error
from spannorm_megatron.lab.grid.spec import ROOT, Grid, load_grid, resolve


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
    env = child_env(OMP_NUM_THREADS=str(grid.threads), MKL_NUM_THREADS=str(grid.threads))
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
    rollbacks = _rollbacks(checkpoints)
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
        "on_collapse": run.setting.on_collapse, "rollbacks": len(rollbacks),
        "extra_iterations": sum(r["event_iteration"] - r["point"] for r in rollbacks),
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
        "rollback_journal": rollbacks,
        "signals": signals_or_error(os.path.join(run_dir, "tensorboard"), s["depth"]),
    }
    return row


def _rollbacks(checkpoints: str) -> List[dict]:
    """The rollbacks a run made (its journal beside the checkpoints; [] without one)."""
    from spannorm_megatron.checkpoint.rollbacks import read_journal

    journal = read_journal(checkpoints) if os.path.isdir(checkpoints) else None
    return journal["rollbacks"] if journal else []


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

