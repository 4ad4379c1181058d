"""The collapse alarm (`--collapse-grad-ratio`, spannorm_megatron/metrics/collapse.py): one
warning, in the log and as TensorBoard text, when the lower layers stop receiving gradient.

End to end on a 24-layer model at a high constant learning rate, where SpanNorm collapses within
15 steps (in one process on the test corpus: layer-2/24 gradient ratio 0.42 at iteration 5,
3.5e-4 at 10, 7e-7 at 15, 8e-9 at 20) and PreNorm, the same model but for the placement, keeps it
at 1.0-1.1 from iteration 10 on. The
default threshold itself is checked against the 128-layer grid's recorded runs.
"""

import math
import os
import re
from collections import defaultdict

import pytest

from launch import ROOT
from _training import SMALL, STRICT_DEVICES, run_train, train_in_process
from spannorm_megatron.config.logging import LoggingConfig
from spannorm_megatron.lab.grid import read_results
from spannorm_megatron.metrics.collapse import CollapseAlarm, layer_ranges

GRID = os.path.join(ROOT, "docs", "stability", "grid", "results.jsonl.gz")
DEFAULT = LoggingConfig().collapse_grad_ratio

DEEP = [*SMALL, "--num-layers", "24", "--hidden-size", "64", "--num-attention-heads", "4",
        "--ffn-hidden-size", "176", "--seq-length", "64", "--micro-batch-size", "4",
        "--global-batch-size", "4", "--lr", "1e-2", "--lr-decay-style", "constant",
        "--lr-warmup-iters", "5", "--train-iters", "20", "--log-interval", "5",
        "--eval-interval", "1000", "--eval-iters", "1", "--split", "98,2,0"]
WARNING = re.compile(r"WARNING: collapse alarm at iteration (\d+): the lower layers stopped "
                     r"receiving gradient\. Layer-2/24 gradient-norm ratio (\S+) < 0\.001 "
                     r"\(--collapse-grad-ratio\); layers (\S+) of 24 get less")


def _signals(grads, updates=None):
    signals = {"grad_norm": dict(enumerate(grads, start=1))}
    if updates is not None:
        signals["update_ratio"] = dict(enumerate(updates, start=1))
    return signals


def test_alarm_fires_once_and_names_the_layers_below_the_threshold():
    alarm = CollapseAlarm(1e-3, num_layers=6)
    assert alarm.check(5, _signals([1.0, 0.5, 0.5, 0.5, 0.5, 1.0])) is None
    # A non-finite step (the guard skips it) and a zero last layer say nothing about collapse.
    assert alarm.check(6, _signals([1.0, math.nan, 0.5, 0.5, 0.5, 1.0])) is None
    assert alarm.check(7, _signals([1.0, 1e-9, 1e-9, 1e-9, 1e-9, 0.0])) is None
    report = alarm.check(10, _signals([2e-4, 5e-4, 0.1, 8e-4, 0.5, 1.0],
                                      [1e-3, 2e-3, 1e-2, 3e-3, 1e-2, 1e-2]))
    assert report is not None
    assert (report.iteration, report.ratio, report.layers) == (10, 5e-4, [1, 2, 4])
    assert report.update_ratio == 2e-3 and report.last_update_ratio == 1e-2
    assert "iteration 10" in report.message() and "layers 1-2, 4 of 6" in report.message()
    assert alarm.check(15, _signals([1e-9] * 5 + [1.0])) is None  # once per run


@pytest.mark.parametrize("threshold,layers", [(0.0, 6), (1e-3, 2)])
def test_alarm_is_off_at_zero_and_for_models_without_lower_layers(threshold, layers):
    alarm = CollapseAlarm(threshold, num_layers=layers)
    assert alarm.check(5, _signals([0.0] * (layers - 1) + [1.0])) is None


def test_layer_ranges():
    assert layer_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
    assert layer_ranges([4]) == "4"


def test_default_threshold_separates_the_grids_collapsing_and_training_runs():
    """Replays every recorded grid run's layer-2 and layer-L gradient norms through the alarm
    at the default: it fires on no PreNorm or spannorm_clean run, on runs of the other
    placements, and every run it fires on ended with a higher validation loss than every run
    of its cell and seed that it stays quiet on."""
    rows = read_results(GRID)
    by_cell = defaultdict(lambda: {True: [], False: []})
    fired_on = set()
    for row in rows:
        s, L = row["signals"], row["depth"]
        alarm = CollapseAlarm(DEFAULT, num_layers=L)
        for iteration, early, last in zip(s["iterations"], s["2/grad_norm"], s["L/grad_norm"]):
            grads = {2: early, L: last}
            if alarm.check(iteration, {"grad_norm": grads}) is not None:
                break
        fired = alarm.fired is not None
        by_cell[(row["cell"], row["seed"])][fired].append(row["final_valid_loss"])
        if fired:
            fired_on.add(row["placement"])
    assert fired_on and not fired_on & {"prenorm", "spannorm_clean"}, fired_on
    for cell, losses in by_cell.items():
        if losses[True] and losses[False]:
            assert min(losses[True]) > max(losses[False]), (cell, losses)


def _alarm_text(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tag = "stability/collapse_alarm/text_summary"
    texts = ([(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
             if tag in events.Tags()["tensors"] else [])
    ratios = {int(e.step): e.value for e in events.Scalars("stability/grad_ratio_2_L")}
    return texts, ratios


def test_alarm_fires_on_a_collapsing_run_and_stays_quiet_on_a_healthy_one(corpus, tmp_path,
                                                                          torchrun):
    data, tokenizer = corpus
    # The collapsing run on 2 pipeline stages (layers 1-12 | 13-24): the ratio spans both, and
    # the warning must still come once, not once per rank.
    collapsing = run_train("--data-path", data, "--tokenizer-model", tokenizer, *DEEP,
                           "--norm-placement", "spannorm",
                           "--pipeline-model-parallel-size", "2",
                           "--tensorboard-dir", str(tmp_path / "spannorm"), env=STRICT_DEVICES)
    assert collapsing.returncode == 0, collapsing.stderr[-4000:]
    warnings = WARNING.findall(collapsing.stdout)
    assert len(warnings) == 1 and collapsing.stdout.count("collapse alarm") == 1, \
        collapsing.stdout[-4000:]
    iteration, ratio, layers = int(warnings[0][0]), float(warnings[0][1]), warnings[0][2]
    assert iteration in (10, 15, 20) and ratio < DEFAULT
    assert layers.startswith(("1-", "2"))  # the lowest layers, from layer 2 or below
    texts, ratios = _alarm_text(str(tmp_path / "spannorm"))
    assert len(texts) == 1 and texts[0][0] == iteration
    assert texts[0][1] in collapsing.stdout  # the same words as the log line
    assert ratios[iteration] == pytest.approx(ratio, rel=0.06)  # printed to 2 digits
    assert all(ratios[i] >= DEFAULT for i in ratios if i < iteration)

    healthy = train_in_process("--data-path", data, "--tokenizer-model", tokenizer, *DEEP,
                               "--norm-placement", "prenorm", "--tensorboard-dir",
                               str(tmp_path / "prenorm"))
    assert healthy.returncode == 0, healthy.stderr[-4000:]
    assert "collapse alarm" not in healthy.stdout + healthy.stderr
    texts, ratios = _alarm_text(str(tmp_path / "prenorm"))
    assert texts == [] and sorted(ratios) == [5, 10, 15, 20]
    assert min(ratios.values()) > 10 * DEFAULT, ratios
