"""Rank program: several `spannorm-train` jobs, one after another, in one torchrun launch.

    torchrun --standalone --nproc_per_node N tests/_train_jobs.py JOBS.json OUT

Why: a launch costs about 13 s of CPU (the launcher, and every rank importing torch and
megatron-core) where a small job costs about 3, so a test module that needs many small jobs on
the same number of ranks runs them in one launch (`_training.train_jobs`). Each job runs as
`spannorm-train` would (`spannorm_megatron.train.main`): its Trainer sets up and tears down its
process groups, and the next job initializes under a fresh store prefix
(spannorm_megatron/runtime/distributed.py). JOBS.json maps a job's name to its flags and the
instruments of tests/_instrumented_train.py, in the order they run, so a job may resume what an
earlier one saved. OUT/<name>/rank<r>.json receives the job's exit status and what it printed;
a job that raises takes every rank down with its traceback (launch.reporting).
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

from _instrumented_train import instrumented_trainer
from launch import reporting, write_result
from spannorm_megatron.train import main


def run_job(job: dict) -> dict:
    trainer_class = instrumented_trainer(set(job.get("nan_at") or ()), job.get("step_times"),
                                         job.get("record_tokens"))
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        status = main(job["flags"], trainer_class=trainer_class)
    return {"status": status, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


if __name__ == "__main__":
    jobs_file, out = sys.argv[1:3]
    with open(jobs_file) as f:
        jobs = json.load(f)
    for name, job in jobs.items():
        where = os.path.join(out, name)
        with reporting(where):
            write_result(where, run_job(job))
