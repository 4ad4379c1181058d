"""The example launchers as users run them: two nodes on one machine (c10d rendezvous on
localhost) against one node of four ranks, the SLURM script under a faked SLURM environment,
a rank that dies under `--max-restarts 1`, and node ranks that cannot agree."""

import os
import shlex
import signal
import socket
import stat
import subprocess
import sys

import pytest

import launch
from _training import SMALL, logged_losses
from launch import ROOT

BIN = os.path.dirname(sys.executable)  # the venv's torchrun and python
FLAGS = [*SMALL, "--global-batch-size", "16", "--log-interval", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(corpus, run_dir, **extra):
    data, tokenizer = corpus
    return launch.environment({
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "CONFIG": os.path.join(ROOT, "examples", "configs", "quickstart.yaml"),
        "DATA": data, "TOKENIZER": tokenizer, "RUN": str(run_dir),
        **{k: str(v) for k, v in extra.items()}})


def _script(name):
    return ["bash", os.path.join(ROOT, "examples", name)]


def test_two_nodes_of_two_ranks_train_as_one_node_of_four(corpus, tmp_path, torchrun):
    flags = [*FLAGS, "--train-iters", "3"]
    single = subprocess.run(_script("train_single_node.sh") + flags, capture_output=True,
                            text=True, timeout=600,
                            env=_env(corpus, tmp_path / "one", NPROC_PER_NODE=4))
    assert single.returncode == 0, single.stderr[-4000:]

    port = _free_port()
    nodes = [subprocess.Popen(_script("train_multi_node.sh") + flags, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(corpus, tmp_path / "two", NNODES=2, NODE_RANK=rank,
                                       NPROC_PER_NODE=2, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, RDZV_ID="launch-test"))
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    expected = logged_losses(single.stdout)
    got = {**logged_losses(outputs[0][0]), **logged_losses(outputs[1][0])}
    assert sorted(expected) == [1, 2, 3] and sorted(got) == [1, 2, 3]
    for iteration, loss in expected.items():
        assert got[iteration] == pytest.approx(loss, rel=1e-6)
    assert "DP 4;" in outputs[0][0] + outputs[1][0]


def _stub(directory, name, body):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _torchrun_args(script, env, tmp_path):
    """The torchrun options the script resolves, per node (torchrun itself is a recorder)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    record = tmp_path / f"{script}.calls"
    _stub(stubs, "torchrun", f'echo "$*" >> {shlex.quote(str(record))}\n')
    _stub(stubs, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun starts the command once per node, as SLURM does with --ntasks-per-node=1.
    _stub(stubs, "srun", 'shift; for n in 0 1; do SLURM_NODEID=$n SLURM_PROCID=$n "$@"; done\n')
    result = subprocess.run(_script(script), capture_output=True, text=True, timeout=60,
                            env={**env, "PATH": f"{stubs}:{env['PATH']}"})
    assert result.returncode == 0, result.stderr
    calls = record.read_text().splitlines()
    options = []
    for call in calls:
        words = call.split()
        options.append({words[i]: words[i + 1] for i in range(len(words) - 1)
                        if words[i] in ("--nnodes", "--nproc_per_node", "--rdzv_backend",
                                        "--rdzv_id", "--rdzv_endpoint", "--max-restarts")})
    return options


def test_slurm_script_resolves_the_rendezvous_of_the_multi_node_script(corpus, tmp_path):
    slurm = _torchrun_args("train_slurm.sbatch", _env(
        corpus, tmp_path / "run", SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES=2,
        SLURM_JOB_ID=4242, GPUS_PER_NODE=2, MASTER_PORT=29600), tmp_path)
    by_hand = [_torchrun_args("train_multi_node.sh", _env(
        corpus, tmp_path / "run", NNODES=2, NODE_RANK=rank, NPROC_PER_NODE=2,
        MASTER_ADDR="node-a", MASTER_PORT=29600, RDZV_ID=4242), tmp_path)[-1]
        for rank in (0, 1)]
    assert len(slurm) == 2  # one torchrun per node
    assert slurm == by_hand
    assert slurm[0] == {"--nnodes": "2", "--nproc_per_node": "2", "--max-restarts": "0",
                        "--rdzv_backend": "c10d", "--rdzv_id": "4242",
                        "--rdzv_endpoint": "node-a:29600"}


@pytest.mark.parametrize("nnodes,node_rank", [("2", "2"), ("2", "-1"), ("two", "0")])
def test_node_ranks_that_cannot_agree_are_refused_before_the_rendezvous(corpus, tmp_path,
                                                                         nnodes, node_rank):
    result = subprocess.run(_script("train_multi_node.sh"), capture_output=True, text=True,
                            timeout=60, env=_env(corpus, tmp_path, NNODES=nnodes,
                                                 NODE_RANK=node_rank, MASTER_ADDR="127.0.0.1"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: N") and "Traceback" not in result.stderr


def test_a_dead_rank_is_restarted_and_the_job_resumes_from_its_checkpoint(corpus, tmp_path,
                                                                          torchrun):
    flags = [*FLAGS, "--train-iters", "10", "--save-interval", "2"]
    job = subprocess.Popen(_script("train_single_node.sh") + flags, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env=_env(corpus, tmp_path, NPROC_PER_NODE=2, MAX_RESTARTS=1))
    lines = []
    for line in job.stdout:
        lines.append(line)
        if " iteration        5/" in line:
            break
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True,
                             text=True).stdout.split()
    assert workers, "torchrun's worker processes not found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    out, err = job.communicate(timeout=600)
    output = "".join(lines) + out
    assert job.returncode == 0, err[-4000:]
    assert "successfully loaded checkpoint" in output and "at iteration 4" in output
    assert " iteration       10/" in output
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() \
        == "10"
