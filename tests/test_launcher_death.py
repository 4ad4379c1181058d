"""Ranks die with their launcher: kill -9 of the torchrun agent leaves no rank training.

Each rank asks the kernel for SIGKILL when its agent dies (`spannorm_megatron.orphans`), so no
orphan keeps training, holding memory and writing into --save. What --save holds afterwards is
what the atomic saves guarantee: only complete iterations, and a pointer to one of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

import launch
from spannorm_megatron.checkpoint import manifest
from spannorm_megatron.checkpoint.naming import iteration_dirs
from spannorm_megatron.checkpoint.tracker import find_latest

RUN = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
       "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
       "--global-batch-size", "4", "--train-iters", "100000", "--lr", "1e-3",
       "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--mock-data",
       "--eval-interval", "100000", "--log-interval", "1", "--num-workers", "0",
       "--transformer-impl", "local", "--save-interval", "3"]


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):  # a finished checkpoint writer
        return ""


def test_killing_the_agent_kills_every_rank_and_leaves_complete_checkpoints(tmp_path, torchrun):
    save = str(tmp_path / "ckpt")
    log = open(tmp_path / "train.log", "w")
    agent = subprocess.Popen(
        launch.torchrun_command(["-m", "spannorm_megatron.train", *RUN, "--save", save]),
        stdout=log, stderr=subprocess.STDOUT, cwd=launch.ROOT, env=launch.environment())
    try:
        deadline = time.monotonic() + 300
        while not (os.path.isdir(save) and find_latest(save) is not None):
            assert agent.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        ranks = psutil.Process(agent.pid).children(recursive=True)  # and their writers
        assert len([r for r in psutil.Process(agent.pid).children()
                    if "spannorm_megatron.train" in _command(r)]) == 2
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=10)
        assert alive == [], f"orphaned after 10 s: {[p.pid for p in alive]}"
    finally:
        if agent.poll() is None:
            agent.kill()
        log.close()
    complete = [path for _, path in iteration_dirs(save)]
    assert complete and all(manifest.is_complete(path) for path in complete)
    assert manifest.is_complete(os.path.join(save, f"iter_{find_latest(save):07d}"))
