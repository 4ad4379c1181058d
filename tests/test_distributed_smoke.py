"""Two ranks under `torchrun` (gloo on CPU) build our models and train them.

Each launch costs ~10 s of imports, so each covers a whole layout: tensor + sequence parallel
SpanNorm (dense), expert-parallel SpanNorm MoE.
"""

import json

import pytest

import launch
from _training import STRICT_DEVICES


def run_selfcheck(*flags, nproc=2, timeout=300):
    result = launch.torchrun("-m", "spannorm_megatron.selfcheck", *flags, nproc=nproc,
                             timeout=timeout, env=STRICT_DEVICES)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    summaries = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                 if line.startswith("SELFCHECK ")]
    assert sorted(s["rank"] for s in summaries) == list(range(nproc))
    return summaries


@pytest.mark.parametrize(
    "flags",
    [
        ["--norm-placement", "spannorm", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
        ["--norm-placement", "spannorm", "--num-experts", "4", "--expert-model-parallel-size", "2"],
    ],
    ids=["spannorm-tp2-sp", "spannorm-moe-ep2"],
)
def test_two_ranks_build_and_train(flags, torchrun):
    summaries = run_selfcheck(*flags, "--train-iters", "6")
    losses = summaries[0]["losses"]
    assert all(l is not None and l == l for l in losses)  # finite, reported by every rank
    assert losses[-1] < losses[0] - 0.3, losses  # memorizing one batch: the loss must fall
    # Both ranks hold one model replica: they must agree on every loss and gradient norm.
    assert summaries[1]["losses"] == losses
    assert summaries[1]["grad_norms"] == summaries[0]["grad_norms"]
