"""Rollbacks (--on-collapse / --on-loss-spike rollback; spannorm_megatron/training/rollback.py):
back to the newest checkpoint before the event, on a changed course, recorded beside the
checkpoints and in TensorBoard, and kept by a later plain resume.

Real runs, no fault-injection hooks:
- a loss spike comes from the data: a blend of a periodic sequence the model learns within a
  few iterations and, at a low weight, uniformly random tokens; the first random sample in the
  training order (found here by reading the blend) is the spike. Under EP2 with a small MoE and
  the distributed optimizer (its dense part sharded over DP2): whole, rolling back to a host
  snapshot (--rollback-snapshot-interval), and cut in the middle, rolling back to a checkpoint
  of the same iteration, with the same losses;
- a collapse comes from the collapse alarm's own test case (24 SpanNorm layers at a constant lr
  1e-2), rolled back on 2 interleaved pipeline stages with the distributed optimizer and
  resumed (--exit-interval, then a resume) under TP2 with sequence parallelism.
A rollback that a crash cut short (its journal entry written, nothing else) is finished at the
next start, under TP2 + SP. The 2-rank runs share two launches (`launched`).
"""

import io
import json
import os
import random
import re

import pytest

from _training import RECIPE, STRICT_DEVICES, logged_losses, train_jobs
from test_collapse_alarm import DEEP, _alarm_text
from spannorm_megatron.checkpoint.rollbacks import (
    ROLLED_BACK_DIRNAME,
    begin_rollback,
    read_journal,
)
from spannorm_megatron.metrics.collapse import CollapseAlarm, fall_began
from spannorm_megatron.training.rollback import RollbackPolicy
from spannorm_megatron.config.rollback import RollbackConfig

PERIOD = 16  # the learnable data: ids 0..15 over and over; the random ids are 16..255
VOCAB = 256


def test_the_fall_begins_at_the_ratios_last_peak_and_a_rollback_rewinds_the_alarm():
    # The grid's spannorm_L128_s1234_base: one fall from the first logged step on.
    grid_run = [(5, 0.94), (10, 0.59), (15, 0.49), (20, 0.033), (25, 0.032), (30, 3.3e-5)]
    assert fall_began(grid_run) == 5
    # postnorm_L128_s1234_base: up to 2 at iteration 15, then through the threshold.
    assert fall_began([(5, 0.96), (10, 0.46), (15, 2.0), (20, 7e-5)]) == 15
    alarm = CollapseAlarm(1e-3, num_layers=4)
    for iteration, ratio in [(5, 1.0), (10, 0.5), (15, 2.0), (20, 0.1), (25, 1e-4)]:
        report = alarm.check(iteration, {"grad_norm": {2: ratio, 4: 1.0}})
    assert report.iteration == 25 and report.fall_began == 15
    alarm.rewind(10)
    assert alarm.ratios == [(5, 1.0), (10, 0.5)] and alarm.active
    assert alarm.check(15, {"grad_norm": {2: 1e-5, 4: 1.0}}).fall_began == 5  # 1.0, 0.5, 1e-5


def test_the_course_compounds_factors_and_warms_up_again_from_the_point():
    policy = RollbackPolicy(RollbackConfig(on_collapse="rollback", rollback_lr_factor=0.5,
                                           rollback_extra_warmup_iters=4))
    assert policy.lr_multiplier(123) == 1.0
    positions = {0: {"consumed_train_samples": 0, "scheduler_steps": 0},
                 20: {"consumed_train_samples": 160, "scheduler_steps": 160}}
    event = policy.on_collapse(type("Report", (), dict(
        iteration=30, fall_began=25, message=lambda self: "alarm"))())
    entry = policy.plan(event, [0, 20, 30], positions.__getitem__, consumed_at_event=240,
                        global_batch_size=8, run_warmup_samples=40)
    assert (entry["point"], entry["skip_batches"], entry["skipped_samples"]) == (20, 10,
                                                                                [160, 240])
    assert entry["source"] == "checkpoint"
    # A host snapshot is the point when it is newer than the newest checkpoint before the event
    # began (25); one of the checkpoint's own iteration, or from the event on, is not.
    at_24 = {24: {"consumed_train_samples": 192, "scheduler_steps": 192}}
    for snapshots, expected in (([20, 24, 25], (24, "snapshot", [192, 240])),
                                ([20, 25], (20, "checkpoint", [160, 240]))):
        chosen = policy.plan(event, [0, 20, 30], {**positions, **at_24}.__getitem__, 240, 8, 40,
                             snapshots=snapshots)
        assert (chosen["point"], chosen["source"], chosen["skipped_samples"]) == expected
    assert (entry["lr_scale"], entry["warmup_samples"], entry["extra_warmup_iters"]) == \
        (0.5, 32, 4)
    policy.follow(entry)
    # The factor times a ramp over 4 iterations (32 samples) from the point's 160 samples.
    assert [policy.lr_multiplier(160 + 8 * i) for i in range(6)] == \
        [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    # A second rollback to the same checkpoint skips from where the first one left the data.
    second = policy.plan(event, [0, 20], positions.__getitem__, 320, 8, 40)
    assert (second["number"], second["lr_scale"], second["skipped_samples"]) == \
        (2, 0.25, [240, 320])


# ---------------------------------------------------------------- a loss spike from the data
@pytest.fixture(scope="module")
def spiky_data(tmp_path_factory, megatron_world):
    """(flags naming the blend, index of the first random sample in the training order after
    the first ten iterations)."""
    from spannorm_megatron.data.dataset import build_gpt_datasets
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess
    from spannorm_megatron.data.tokenizer import build_tokenizer
    from spannorm_megatron.training.arguments import parse_args

    root = tmp_path_factory.mktemp("spiky")
    rng = random.Random(0)
    documents = {
        "periodic": [" ".join(str(i % PERIOD) for i in range(4000)) for _ in range(4)],
        "random": [" ".join(str(rng.randrange(PERIOD, VOCAB)) for _ in range(4000))
                   for _ in range(4)],
    }
    for name, texts in documents.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                    for t in texts))
        preprocess(PreprocessConfig(input=str(root / f"{name}.jsonl"),
                                    output_prefix=str(root / name),
                                    tokenizer_type="NullTokenizer", vocab_size=VOCAB,
                                    append_eod=True), log=io.StringIO())
    data = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--data-path",
            "120", str(root / "periodic_text_document"), "1", str(root / "random_text_document"),
            "--split", "100,0,0"]
    job = parse_args([*SPIKY, *data])
    train, _, _ = build_gpt_datasets(job.data, build_tokenizer(job.tokenizer), (400, 0, 0),
                                     check_prefixes=False)
    def random_tokens(tokens):  # VOCAB itself is NullTokenizer's end of document
        return int(((tokens >= PERIOD) & (tokens < VOCAB)).sum())

    # megatron-core's blending puts one random sample at index 1 (in the first iteration, before
    # the spike detector judges anything), the next ones every ~121 samples.
    noisy = [i for i in range(400) if random_tokens(train[i]["tokens"]) > 32]
    return data, next(i for i in noisy if i >= 40)


SPIKY = [*RECIPE[:RECIPE.index("--tokenizer-type")], "--num-workers", "0",
         "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--ffn-hidden-size", "256", "--seq-length", "64", "--max-position-embeddings", "64",
         "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "40",
         "--lr", "3e-3", "--lr-warmup-iters", "2", "--lr-decay-style", "constant",
         "--log-interval", "1", "--eval-iters", "0", "--save-interval", "10",
         "--loss-spike-factor", "3", "--loss-spike-window", "5"]


# The spike runs' layout: expert parallelism over both ranks, so the dense parameters are data-
# parallel over 2 and the distributed optimizer shards them (and chains a second optimizer for
# the experts).
SPIKE_LAYOUT = ["--num-experts", "4", "--moe-router-topk", "2", "--expert-model-parallel-size",
                "2", "--use-distributed-optimizer", "--micro-batch-size", "2"]
# A rollback a crash cut short is finished under TP2 + SP with the distributed optimizer.
CRASH_LAYOUT = ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                "--use-distributed-optimizer"]
# The collapse run rolls back on 2 interleaved pipeline stages and resumes under TP2 + SP (its
# 24 layers' tensor-parallel collectives cost more than the pipeline's, so only for the resume).
COLLAPSE_LAYOUTS = {
    # (the interleaved schedule takes micro-batches in groups of 2: 2 of 2 samples per step)
    "first": ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size",
              "2", "--use-distributed-optimizer", "--micro-batch-size", "2"],
    "resumed": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                "--use-distributed-optimizer"],
}


@pytest.fixture(scope="module")
def launched(spiky_data, corpus, torchrun, tmp_path_factory):
    """(first launch's results, second's, folder): the 2-rank runs of the spike and collapse
    tests in two launches (`_training.train_jobs`), the first (the live rollbacks:
    to a checkpoint, to a host snapshot, after a collapse) under strict device mode; the second
    resumes them.

    - spike `whole`: checkpoints every 20, host snapshots every 5; `cut`: checkpoints every 10,
      stopped at 36 (--exit-interval); `rest` resumes `cut` with no policy flag;
    - `crash` stops at 20; between the launches its journal gets the pending entry a crash
      right after a rollback's first step leaves (back to 10); the second launch resumes it;
    - collapse `first` stops at 15 (--exit-interval), after its rollback; `resumed` goes on
      with the same flags in another layout."""
    root = tmp_path_factory.mktemp("launched")
    data, _ = spiky_data

    def spike(name, *flags):
        save = root / name
        return {"flags": [*SPIKY, *data, *SPIKE_LAYOUT, "--save", save, "--load", save,
                          "--tensorboard-dir", root / f"{name}_tb", *flags]}

    corpus_data, tokenizer = corpus
    save = root / "collapse"
    collapse = ["--data-path", corpus_data, "--tokenizer-model", tokenizer, *DEEP,
                "--norm-placement", "spannorm", "--save", save, "--load", save,
                "--tensorboard-dir", root / "collapse_tb", "--on-collapse", "rollback",
                "--max-rollbacks", "2"]
    crash = root / "crash"
    crash_flags = [*SPIKY, *data, *CRASH_LAYOUT, "--save", crash, "--load", crash,
                   "--on-loss-spike", "rollback", "--loss-spike-factor", "100",
                   "--train-iters", "24"]
    first = train_jobs({
        "crash": {"flags": [*crash_flags, "--exit-interval", "20"]},
        "collapse": {"flags": [*collapse, *COLLAPSE_LAYOUTS["first"], "--exit-interval", "15"]},
        "whole": spike("whole", "--on-loss-spike", "rollback", "--save-interval", "20",
                       "--rollback-snapshot-interval", "5"),
        "cut": spike("cut", "--on-loss-spike", "rollback", "--exit-interval", "36"),
    }, root / "first", env=STRICT_DEVICES)
    if first["crash"].returncode == 0:
        begin_rollback(str(crash), {
            "number": 1, "cause": "loss spike", "event_iteration": 20, "began": 20, "point": 10,
            "lr_factor": 0.5, "lr_scale": 0.5, "extra_warmup_iters": 0, "warmup_samples": 0,
            "warmup_from_samples": 40, "skip_batches": 10, "skipped_samples": [40, 80],
            "detail": "as a rollback writes it"})  # (no source: as journals before snapshots)
    second = train_jobs({
        "crash": {"flags": crash_flags},
        "collapse": {"flags": [*collapse, *COLLAPSE_LAYOUTS["resumed"]]},
        "rest": spike("cut"),
    }, root / "second")  # resumes: the strict launch above has the rollbacks themselves
    return first, second, root


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_spike_rolls_back_skips_its_batches_and_a_plain_resume_keeps_the_course(
        spiky_data, launched):
    _, noisy = spiky_data
    first, second, root = launched
    whole, cut, rest = _ok(first["whole"]), _ok(first["cut"]), _ok(second["rest"])
    whole_dir, cut_dir = str(root / "whole"), str(root / "cut")
    spike = noisy // 4 + 1  # the iteration whose global batch of 4 holds it
    assert 25 <= spike <= 35 and spike % 5, noisy  # after the loss has fallen, before the cut

    [entry] = read_journal(whole_dir)["rollbacks"]
    point = (spike - 1) // 5 * 5  # the newest host snapshot before it, newer than checkpoint 20
    assert point % 20
    assert (entry["cause"], entry["event_iteration"], entry["point"], entry["source"]) == \
        ("loss spike", spike, point, "snapshot")
    first_skipped, end = entry["skipped_samples"]
    assert first_skipped <= noisy < end == 4 * spike and entry["skip_batches"] == spike - point
    assert f"rollback 1: loss spike at iteration {spike}" in whole.stdout
    assert f"back to the host snapshot of iteration {point}" in whole.stdout
    # The skipped batch never comes back: one spike in the whole run.
    assert len(re.findall(r"^ loss spike at iteration", whole.stdout, re.M)) == 1
    losses = logged_losses(whole.stdout)
    assert losses[40] < 0.2, losses
    # The snapshot became the checkpoint of its iteration; the run saved nothing after it
    # before the spike, so nothing was rolled back on disk.
    assert f"iter_{point:07d}" in os.listdir(whole_dir)
    assert not os.path.isdir(os.path.join(whole_dir, ROLLED_BACK_DIRNAME))
    assert read_journal(whole_dir)["rollbacks"][0]["status"] == "done"

    # The cut run saves every 10 iterations, so its rollback point is the checkpoint of the same
    # iteration: the same course, and the same losses as the run that went back to the snapshot,
    # before and after the rollback and after the cut (the resume names no policy and keeps the
    # lowered learning rate, x0.5 of 3e-3).
    [cut_entry] = read_journal(cut_dir)["rollbacks"]
    assert cut_entry == dict(entry, source="checkpoint")
    assert f"back to the checkpoint of iteration {point}" in cut.stdout
    kept = os.path.join(cut_dir, ROLLED_BACK_DIRNAME, "1")
    assert (sorted(os.listdir(kept)) if os.path.isdir(kept) else []) == \
        ([f"iter_{spike // 10 * 10:07d}"] if spike // 10 * 10 > point else [])
    assert logged_losses(cut.stdout) == {i: losses[i] for i in range(1, 37)}
    assert "this run follows the course its 1 rollback(s) set (loss spike at iteration " \
        f"{spike} -> {point})" in rest.stdout
    assert re.search(r"iteration\s+40/\s+40 \|.*learning rate: 1\.500000E-03", rest.stdout)
    assert logged_losses(rest.stdout) == {i: losses[i] for i in range(37, 41)}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def rollback_scalars(name):
        events = EventAccumulator(str(root / f"{name}_tb")).Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
                for tag in events.Tags()["scalars"] if tag.startswith("rollback/")}

    expected = {"rollback/count": [(spike, 1.0)], "rollback/point": [(spike, point)],
                "rollback/lr_scale": [(spike, 0.5)],
                "rollback/extra_warmup_iters": [(spike, 2.0)],
                "rollback/skipped_batches": [(spike, spike - point)],
                "rollback/from_snapshot": [(spike, 1.0)]}
    assert rollback_scalars("whole") == expected
    assert rollback_scalars("cut") == dict(expected, **{"rollback/from_snapshot": [(spike, 0.0)]})


@pytest.mark.slow
def test_a_rollback_cut_short_by_a_crash_is_finished_at_the_next_start(launched):
    """What a crash right after the journal entry leaves (the entry pending, the pointer and the
    later checkpoints untouched) is finished by the next start, which resumes at the point."""
    first, second, root = launched
    _ok(first["crash"])
    resumed = _ok(second["crash"])
    save = str(root / "crash")
    assert "TP 2, PP 1, EP 1, DP 1" in resumed.stdout
    assert "successfully loaded checkpoint from" in resumed.stdout
    assert re.search(r"at iteration 10\b", resumed.stdout), resumed.stdout[-3000:]
    assert sorted(os.listdir(os.path.join(save, ROLLED_BACK_DIRNAME, "1"))) == ["iter_0000020"]
    assert read_journal(save)["rollbacks"][0]["status"] == "done"
    assert min(logged_losses(resumed.stdout)) == 11
    assert re.search(r"iteration\s+11/\s+24 \| consumed samples:\s+84 \|.*learning rate: "
                     r"1\.500000E-03", resumed.stdout), resumed.stdout[-3000:]


# ---------------------------------------------------------------- a collapse
@pytest.mark.slow
def test_a_collapse_rolls_back_and_the_run_trains_on_with_the_alarm_quiet(launched):
    # Cut after the rollback (the alarm fires at 10, the run goes back to 0): the first launch
    # ends at 15 on 2 interleaved pipeline stages, the second resumes there with the same flags
    # under TP2 + SP and ends at 20.
    first_launch, second_launch, root = launched
    first, second = _ok(first_launch["collapse"]), _ok(second_launch["collapse"])
    save = str(root / "collapse")
    assert first.stdout.count("collapse alarm at iteration") == 1
    assert "TP 1, PP 2" in first.stdout and "TP 2, PP 1" in second.stdout
    [entry] = read_journal(save)["rollbacks"]
    assert (entry["cause"], entry["point"], entry["lr_scale"], entry["source"]) == \
        ("collapse", 0, 0.5, "checkpoint")
    assert entry["event_iteration"] in (10, 15) and entry["began"] < entry["event_iteration"]
    assert "collapse alarm" not in second.stdout
    assert "this run follows the course its 1 rollback(s) set (collapse at iteration" \
        in second.stdout
    assert len(read_journal(save)["rollbacks"]) == 1
    texts, ratios = _alarm_text(str(root / "collapse_tb"))
    assert [step for step, _ in texts] == [entry["event_iteration"]]
    # The new course's ratios (the last value written at each step) stay above the threshold.
    assert sorted(ratios) == [5, 10, 15, 20] and min(ratios.values()) >= 1e-3, ratios
