"""Running `spannorm-train` from tests: its command line, the log-line parser and a small model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict, Optional, Tuple

import launch
from spannorm_megatron.config.model import recipe_flags
from spannorm_megatron.training.log_format import parse_lines

# Strict device mode (runtime/strict_devices.py): a tensor a GPU run would hold on the wrong device
# fails on CPU too. Multi-rank tests of the loop, the tools and the lab run under it.
STRICT_DEVICES = {"SPANNORM_STRICT_DEVICES": "1"}

# The run every test trains unless it says otherwise: the project's recipe
# (spannorm_megatron.config.model_values.MODERN_RECIPE) and optimizer settings, spelled as Megatron-LM flags
# (whose defaults describe GPT-2), with data loading in the training process.
RECIPE = [*recipe_flags(), "--tokenizer-type", "SentencePieceTokenizer", "--adam-beta2", "0.95",
          "--lr-decay-style", "cosine", "--num-workers", "0"]

# A model small enough for a two-rank CPU run in seconds.
SMALL = [*RECIPE, "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--ffn-hidden-size", "256", "--seq-length", "64", "--max-position-embeddings", "64",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "100",
         "--lr", "1e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
         "--eval-interval", "1000", "--eval-iters", "1", "--split", "90,10,0"]


def prepare_corpus(root, max_bytes: int = 1_000_000, name: str = "stdlib",
                   tokenizer: str = "tok") -> Tuple[str, str]:
    """(data prefix, tokenizer model) for a slice of the embedded corpus, prepared under `root`
    by our tools' own functions: ``<name>.jsonl``, ``<tokenizer>.model`` (vocabulary 512) and
    the indexed dataset ``<name>_text_document``."""
    from spannorm_megatron.data.corpus import write_embedded_corpus
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess
    from spannorm_megatron.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_sentencepiece,
    )

    documents = root / f"{name}.jsonl"
    write_embedded_corpus(documents, max_bytes=max_bytes)
    train_sentencepiece(TokenizerTrainingConfig(model_prefix=str(root / tokenizer),
                                                inputs=[str(documents)], vocab_size=512),
                        log=io.StringIO())
    preprocess(PreprocessConfig(input=str(documents), output_prefix=str(root / name),
                                tokenizer_model=str(root / f"{tokenizer}.model"),
                                append_eod=True),
               log=io.StringIO())
    return str(root / f"{name}_text_document"), str(root / f"{tokenizer}.model")


def train_command(*flags, nproc=2, nan_at: Optional[str] = None,
                  step_times: Optional[str] = None, record_tokens: Optional[str] = None):
    """The command line of `spannorm-train` under torchrun, or of one plain process for
    nproc=1 (so that what the tests read on stderr is ours, not the launcher's report of a
    failed child). `nan_at="4,5"` injects NaN losses there, `step_times=FILE` records each
    step's duration, `record_tokens=PREFIX` each rank's input tokens per iteration
    (tests/_instrumented_train.py)."""
    program = ["-m", "spannorm_megatron.train"]
    if nan_at is not None or step_times is not None or record_tokens is not None:
        instruments = [item for option, value in (("--nan-at", nan_at),
                                                  ("--step-times", step_times),
                                                  ("--record-tokens", record_tokens))
                       if value is not None for item in (option, value)]
        program = [str(launch.TESTS / "_instrumented_train.py"), *instruments, "--"]
    flags = [str(flag) for flag in flags]
    if nproc == 1:
        return [sys.executable, *program, *flags]
    launch.require_torchrun_marker()
    return launch.torchrun_command([*program, *flags], nproc)


def run_train(*flags, nproc=2, timeout=600, env=None, nan_at: Optional[str] = None,
              step_times: Optional[str] = None, record_tokens: Optional[str] = None):
    """Run `train_command(...)`; `env` adds to the environment (tests/launch.py's)."""
    cmd = train_command(*flags, nproc=nproc, nan_at=nan_at, step_times=step_times,
                        record_tokens=record_tokens)
    return launch.run(cmd, timeout=timeout, env=env)


def train_jobs(jobs: Dict[str, dict], where, nproc: int = 2, timeout: float = 1800,
               env=None) -> Dict[str, subprocess.CompletedProcess]:
    """Several `spannorm-train` jobs in one torchrun launch of `nproc` ranks, in order
    (tests/_train_jobs.py: a launch costs about four small jobs). `jobs` maps a name to
    {"flags": [...]} plus, optionally, the instruments `nan_at` (iterations), `step_times` and
    `record_tokens` (paths) of `train_command`. Returns each job's exit status (the first
    non-zero rank's) with its ranks' stdout and stderr joined in rank order. What a job's
    checkpoint writers print goes to the launch's own output, not the job's."""
    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    jobs = {name: {**job, "flags": [str(flag) for flag in job["flags"]]}
            for name, job in jobs.items()}
    (where / "jobs.json").write_text(json.dumps(jobs, default=str))  # paths as strings
    launch.check_launch(launch.torchrun(launch.TESTS / "_train_jobs.py", where / "jobs.json",
                                        where, nproc=nproc, timeout=timeout, env=env), where)
    results = {}
    for name in jobs:
        records = launch.rank_results(where / name, nproc)
        status = next((r["status"] for r in records if r["status"]), 0)
        results[name] = subprocess.CompletedProcess(
            ["spannorm-train", *jobs[name]["flags"]], status,
            "".join(r["stdout"] for r in records), "".join(r["stderr"] for r in records))
    return results


class StepHooks:
    """A monitor for `training.loop.train_step` made of two callables: `before(optimizer)` runs
    between the backward pass and the optimizer step (the gradients are there), `after()` right
    after the step."""

    def __init__(self, before=None, after=None):
        self.before, self.after = before, after

    def before_optimizer_step(self, optimizer):
        if self.before is not None:
            self.before(optimizer)

    def after_optimizer_step(self):
        if self.after is not None:
            self.after()


def train_in_process(*flags, nan_at: Optional[str] = None, nan_weights: bool = False,
                     sigterm_at_valid_batch: Optional[int] = None
                     ) -> subprocess.CompletedProcess:
    """`spannorm-train flags` as one rank of this process, without a new interpreter's ~10 s
    of imports: its exit status, stdout and stderr, as `run_train(..., nproc=1)` gives them
    (`nan_at` as there). A run tears its process groups down on the way out; the world of one
    that conftest.py's `megatron_world` made is set up again afterwards for the tests that
    follow. Its numbers come from this process's thread count: compare them with runs made the
    same way, not with a launched process's. `nan_weights` and `sigterm_at_valid_batch` as
    tests/_instrumented_train.py's `instrumented_trainer` takes them."""
    from megatron.core import parallel_state

    from spannorm_megatron.process import initialize
    from spannorm_megatron.train import main
    from spannorm_megatron.training.trainer import Trainer

    trainer_class = Trainer
    if nan_at is not None or nan_weights or sigterm_at_valid_batch is not None:
        from _instrumented_train import instrumented_trainer

        trainer_class = instrumented_trainer(
            {int(i) for i in (nan_at or "").split(",") if i}, nan_weights=nan_weights,
            sigterm_at_valid_batch=sigterm_at_valid_batch)
    argv = [str(flag) for flag in flags]
    had_world = parallel_state.model_parallel_is_initialized()
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        status = main(argv, trainer_class=trainer_class)
    if had_world and not parallel_state.model_parallel_is_initialized():
        initialize(seed=1234)
    return subprocess.CompletedProcess(["spannorm-train", *argv], status, stdout.getvalue(),
                                       stderr.getvalue())


def logged_losses(stdout: str) -> dict:
    """iteration -> lm loss, from Megatron-LM style log lines (the log format's own parser)."""
    return {line.iteration: line.lm_loss for line in parse_lines(stdout)[0]}
