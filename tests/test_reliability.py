"""Faults injected into real `spannorm-train` runs: NaN gradients, SIGTERM, a time budget,
kill -9 at a random point, and determinism of the same command run twice."""

import math
import os
import random
import re
import signal
import subprocess
import time

import pytest

import launch
from _training import SMALL, run_train, train_command, train_in_process
from spannorm_megatron.checkpoint.lock import LOCK_FILENAME
from spannorm_megatron.checkpoint.naming import TMP_INFIX as TMP
from test_training import tensorboard_scalars



def base_flags(corpus_paths, tmp_path, iters):
    data, tokenizer = corpus_paths
    return ["--data-path", data, "--tokenizer-model", tokenizer, *SMALL,
            "--train-iters", str(iters)]


def run(flags, nan_at=None, **instruments):
    """One rank, in this process (no interpreter start-up); `instruments` as
    `train_in_process` takes them."""
    return train_in_process(*flags, nan_at=nan_at, **instruments)


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_stop_the_run_when_consecutive(corpus, tmp_path):
    flags = base_flags(corpus, tmp_path, 10) + ["--max-skipped-iterations", "2"]
    clean = run(flags + ["--tensorboard-dir", str(tmp_path / "clean")])
    assert clean.returncode == 0, clean.stderr[-3000:]

    one_bad = run(flags + ["--tensorboard-dir", str(tmp_path / "skip")],
                  nan_at="4")
    assert one_bad.returncode == 0, one_bad.stderr[-3000:]
    assert "iteration 4: non-finite gradients" in one_bad.stdout
    scalars = tensorboard_scalars(tmp_path / "skip")[0]
    assert scalars["skipped-iterations"][4] == 1
    clean_losses = tensorboard_scalars(tmp_path / "clean")[0]["lm loss"]
    skipped_losses = scalars["lm loss"]
    for step in (1, 2, 3):  # identical up to the bad step
        assert skipped_losses[step] == clean_losses[step]
    assert math.isnan(skipped_losses[4])
    # The NaN never reached the weights: every later step is finite again.
    assert all(math.isfinite(skipped_losses[step]) for step in range(5, 11))

    stopped = run(flags, nan_at="6,7")
    assert stopped.returncode == 1
    assert "iteration 7: non-finite gradients for 2 steps in a row" in stopped.stderr
    assert "lowest layer with a non-finite gradient: 1" in stopped.stderr
    assert "Traceback" not in stopped.stderr


def test_a_run_that_went_non_finite_stops_with_status_1_and_saves_no_nan(corpus, tmp_path):
    """A resume from NaN weights (put in once the run is set up) skips every step: the run
    stops with status 1 at its last log window, and no save, periodic or final, writes NaN."""
    ckpt = tmp_path / "ckpt"
    flags = base_flags(corpus, tmp_path, 2) + ["--lr-decay-iters", "100", "--save", str(ckpt),
                                                "--load", str(ckpt)]
    assert run(flags).returncode == 0
    pointer = ckpt / "latest_checkpointed_iteration.txt"

    # The last log window (--log-interval 1: iteration 3) without one update: no final save.
    ended = run(flags + ["--train-iters", "3"], nan_weights=True)
    assert ended.returncode == 1, ended.stderr[-3000:]
    ours = [line for line in ended.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "Traceback" not in ended.stderr, ended.stderr[-3000:]
    assert "iteration 3, the run's last log window: every step was skipped" in ours[0]
    assert (f"the last good checkpoint is iteration 2 ({ckpt / 'iter_0000002'})"
            in ours[0])
    assert "iteration 3: non-finite gradients" in ended.stdout

    # A periodic save inside a log window: the weights are checked before it is written.
    periodic = run(flags + ["--train-iters", "6", "--log-interval", "4", "--save-interval", "1"],
                   nan_weights=True)
    assert periodic.returncode == 1, periodic.stderr[-3000:]
    assert ("iteration 3: the weights hold NaN/Inf values (lowest layer with one: 1); not "
            "saving them") in periodic.stderr
    assert pointer.read_text().strip() == "2"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000002"]


@pytest.mark.slow
def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = base_flags(corpus, tmp_path, 100000) + ["--save", str(ckpt)]
    process = subprocess.Popen(train_command(*flags, nproc=1), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=launch.environment())
    for line in process.stdout:
        if " iteration        3/" in line:
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "(received SIGTERM)" in stdout
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 3 and (ckpt / f"iter_{saved:07d}" / "manifest.json").exists()


def test_sigterm_during_a_long_evaluation_stops_it_within_one_iteration(corpus, tmp_path):
    """SIGTERM as the 3rd validation micro-batch of 100 is drawn (2 per iteration): the
    evaluation stops before its 3rd iteration, the run saves and exits as on any SIGTERM. Its
    100 validation iterations repeat the small validation split, which the run says once."""
    ckpt = tmp_path / "ckpt"
    flags = base_flags(corpus, tmp_path, 4) + ["--eval-interval", "2", "--eval-iters", "100",
                                                "--save", str(ckpt)]
    result = run(flags, sigterm_at_valid_batch=3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("validation at iteration 2 stopped after 2 of 100 iterations (received SIGTERM): "
            "no validation loss") in result.stdout
    assert "exiting program at iteration 2 (received SIGTERM)" in result.stdout
    assert "validation loss at iteration" not in result.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    repeats = [line for line in result.stdout.splitlines() if "megatron-core repeats" in line]
    assert len(repeats) == 1 and repeats[0].startswith("> the data is smaller than the run")
    assert f"the validation split of {corpus[0]} " in repeats[0]
    found = re.search(r"validation split of \S+ (\d+) times \(([\d,]+) tokens an epoch; "
                      r"([\d,]+) samples of 64 tokens asked\)", repeats[0])
    epochs, tokens, samples = (int(group.replace(",", "")) for group in found.groups())
    assert samples == (4 // 2 + 1) * 100 * 8  # Megatron-LM's count: every evaluation's batches
    assert (epochs - 1) * tokens < samples * 64 + 1 <= epochs * tokens  # the one more token
    assert "the train split" not in repeats[0]  # 4 x 8 samples fit in one epoch of it


def test_exit_duration_asks_every_rank_to_stop_once_the_minutes_are_up(megatron_world):
    """--exit-duration-in-mins counts whole minutes, as Megatron-LM's int flag does; the save and
    exit that follow a reason are the --exit-interval and SIGTERM path (test_training's resume
    tests, test_sigterm_saves_a_final_checkpoint_and_exits_cleanly here). So the clock is moved,
    not waited for."""
    from spannorm_megatron.training.guards import ExitConditions

    exits = ExitConditions(1)
    try:
        assert exits.reason() is None
        exits.start -= 61  # the run started 61 s ago
        assert exits.reason() == "exit duration of 1 minutes reached"
    finally:
        exits.close()
    unlimited = ExitConditions(None)
    try:
        unlimited.start -= 10 ** 6
        assert unlimited.reason() is None
    finally:
        unlimited.close()


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_the_same_command_resumes_bitwise(corpus, tmp_path):
    iters = 24
    common = base_flags(corpus, tmp_path, iters) + ["--save-interval", "2"]
    # Launched processes all three: the resumed losses must equal the whole run's bit for bit.
    whole = run_train(*common, "--tensorboard-dir", tmp_path / "whole", nproc=1)
    assert whole.returncode == 0, whole.stderr[-3000:]

    ckpt = tmp_path / "ckpt"
    flags = common + ["--save", str(ckpt), "--load", str(ckpt)]
    process = subprocess.Popen(train_command(*flags, "--tensorboard-dir",
                                             str(tmp_path / "killed"), nproc=1),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=launch.environment(), start_new_session=True)
    rng = random.Random(os.getpid())
    kill_after = rng.randint(5, 16)
    for line in process.stdout:
        if f" iteration {kill_after:8d}/" in line:
            break
    # Lands mid-step or, after even iterations (--save-interval 2), mid-save.
    time.sleep(rng.uniform(0.0, 0.15))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)

    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 4 and (ckpt / f"iter_{latest:07d}" / "manifest.json").exists()
    resumed = run_train(*flags, "--tensorboard-dir", tmp_path / "resumed", nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = tensorboard_scalars(tmp_path / "whole")[0]["lm loss"]
    got = tensorboard_scalars(tmp_path / "resumed")[0]["lm loss"]
    assert sorted(got) == list(range(latest + 1, iters + 1))
    assert all(got[step] == expected[step] for step in got)


@pytest.mark.slow
def test_same_seed_and_layout_give_bitwise_identical_losses(corpus, tmp_path):
    flags = base_flags(corpus, tmp_path, 6)
    for name in ("a", "b"):
        result = run(flags + ["--tensorboard-dir", str(tmp_path / name)])
        assert result.returncode == 0, result.stderr[-3000:]
    a = tensorboard_scalars(tmp_path / "a")[0]["lm loss"]
    b = tensorboard_scalars(tmp_path / "b")[0]["lm loss"]
    assert len(a) == 6 and a == b


@pytest.mark.slow
def test_corrupted_checkpoint_is_named_and_fallback_only_when_asked(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    common = base_flags(corpus, tmp_path, 4) + ["--save-interval", "2", "--lr-decay-iters", "6"]
    whole = run(common + ["--save", str(ckpt), "--tensorboard-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    shard = sorted((ckpt / "iter_0000004").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    more = ["--train-iters", "6", "--load", str(ckpt)]
    refused = run(common + more)
    assert refused.returncode == 2
    assert shard.name in refused.stderr and "Traceback" not in refused.stderr

    resumed = run(common + more + ["--load-fallback", "--tensorboard-dir",
                                   str(tmp_path / "resumed")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--load-fallback: skipping the latest checkpoint" in resumed.stdout
    assert "at iteration 2" in resumed.stdout
    expected = tensorboard_scalars(tmp_path / "whole")[0]["lm loss"]
    got = tensorboard_scalars(tmp_path / "resumed")[0]["lm loss"]
    assert got[3] == expected[3] and got[4] == expected[4]
    assert shard.read_bytes() == bytes(data)  # the damaged file was left as it was


def test_loss_spike_detector_flags_losses_above_the_running_median():
    from spannorm_megatron.training.guards import SpikeDetector

    detector = SpikeDetector(factor=1.5, window=5)
    losses = [4.0, 3.9, 3.8, 3.7, 3.6, 3.5, 6.0, 3.4, float("nan"), 3.3]
    flagged = {i: detector.check(loss) for i, loss in enumerate(losses)}
    assert [i for i, median in flagged.items() if median is not None] == [6]
    assert flagged[6] == 3.7  # median of the five losses before it


def test_kill_9_of_one_rank_of_two_then_the_same_command_resumes_bitwise(corpus, tmp_path,
                                                                         torchrun):
    """torchrun tears the job down when one rank dies; the relaunch resumes exactly."""
    iters = 16
    common = base_flags(corpus, tmp_path, iters) + ["--save-interval", "2"]
    whole = run_train(*common, "--tensorboard-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    ckpt = tmp_path / "ckpt"
    job = common + ["--save", str(ckpt), "--load", str(ckpt)]
    process = subprocess.Popen(train_command(*job, "--tensorboard-dir", tmp_path / "a"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=launch.environment(), start_new_session=True)
    for line in process.stdout:
        if " iteration        7/" in line:
            break
    # The ranks are torchrun's children: kill -9 one of them (rank 0's process).
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                              text=True).stdout.split()
    os.kill(int(children[0]), signal.SIGKILL)
    process.wait(timeout=120)
    assert process.returncode != 0
    _assert_nothing_of_the_run_is_alive_10_s_later(process.pid)

    latest = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 6
    resumed = run_train(*job, "--tensorboard-dir", tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = tensorboard_scalars(tmp_path / "whole")[0]["lm loss"]
    got = tensorboard_scalars(tmp_path / "b")[0]["lm loss"]
    assert sorted(got) == list(range(latest + 1, iters + 1))
    assert all(got[step] == expected[step] for step in got)


def test_non_finite_guard_names_the_lowest_bad_layer_from_device_flags(megatron_world):
    """The guard on a real 4-layer model's gradient buffers: finite -> None; NaN in layer 3 and
    Inf in layer 2 -> 2; only the output layer bad -> 0 (outside the layers)."""
    import _checkpoint as H
    from spannorm_megatron.checkpoint.state import unwrap
    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.training.guards import NonFiniteGuard

    chunks, _, _ = H.build(H.model_config(), ParallelConfig())
    guard = NonFiniteGuard(chunks, max_in_a_row=3)
    for param in chunks[0].parameters():
        param.main_grad.normal_()
    assert guard.first_bad_layer() is None
    layers = unwrap(chunks[0]).decoder.layers
    next(layers[2].parameters()).main_grad.view(-1)[5] = float("nan")
    next(layers[1].mlp.parameters()).main_grad.view(-1)[0] = float("inf")
    assert guard.first_bad_layer() == 2
    for param in chunks[0].parameters():
        param.main_grad.normal_()
    unwrap(chunks[0]).output_layer.weight.main_grad[0, 0] = float("-inf")
    assert guard.first_bad_layer() == 0


def _assert_nothing_of_the_run_is_alive_10_s_later(session: int) -> None:
    """No rank, checkpoint writer, results-queue server or worker of the run (all in the session
    the test started it in) survives it."""
    deadline = time.time() + 10
    while True:
        alive = subprocess.run(["pgrep", "-a", "-s", str(session)], capture_output=True,
                               text=True).stdout.strip()
        if not alive or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not alive, f"still alive 10 s after the run died:\n{alive}"


def test_kill_9_of_both_ranks_during_a_save_leaves_no_process_and_no_debris(corpus, tmp_path,
                                                                            torchrun):
    ckpt = tmp_path / "ckpt"
    job = base_flags(corpus, tmp_path, 400) + ["--save-interval", "1", "--save", str(ckpt),
                                                "--load", str(ckpt)]
    process = subprocess.Popen(train_command(*job), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=launch.environment(),
                               start_new_session=True)
    deadline = time.time() + 300
    while not any(TMP in p.name for p in ckpt.glob("iter_*")) and time.time() < deadline:
        time.sleep(0.02)  # a save is being written
    ranks = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2 and any(TMP in p.name for p in ckpt.glob("iter_*"))
    for rank in ranks:
        os.kill(int(rank), signal.SIGKILL)
    process.wait(timeout=120)
    _assert_nothing_of_the_run_is_alive_10_s_later(process.pid)

    # The next start cleans the half-written save away and resumes from the last complete one.
    again = run_train(*job, "--exit-interval", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [p.name for p in ckpt.iterdir() if TMP in p.name]


@pytest.mark.slow
def test_a_save_without_room_fails_with_status_1_and_names_the_last_good_checkpoint(
        corpus, tmp_path):
    """A file-size limit stands in for a full disk (both are refused writes, EFBIG / ENOSPC):
    the save fails at once with one message and status 1 (a fault, not bad input), naming the
    checkpoint a resume would load, or that there is none; what was saved before stays as it
    was. The limit is this process's soft one, put back after each run."""
    import hashlib
    import resource

    ckpt = tmp_path / "ckpt"
    flags = base_flags(corpus, tmp_path, 2) + ["--lr-decay-iters", "100", "--save", str(ckpt),
                                                "--load", str(ckpt)]

    def limited(*more):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
        try:
            result = run(flags + list(more))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)
        assert result.returncode == 1, result.stderr[-3000:]
        ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert "Traceback" not in result.stderr and len(ours) == 1, result.stderr[-3000:]
        return ours[0]

    first = limited()
    assert f"Saving iteration 2 to {ckpt} failed: File too large" in first
    assert f"{ckpt} holds no checkpoint yet: there is none to resume from" in first
    assert not [p for p in ckpt.iterdir() if p.name.startswith("iter_")]

    assert run(flags).returncode == 0

    def files():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in ckpt.rglob("*")
                if p.is_file() and p.name != LOCK_FILENAME}  # the lock says who ran last

    before = files()
    later = limited("--train-iters", "4")  # the last one counts (base_flags starts from SMALL's)
    assert f"Saving iteration 4 to {ckpt} failed: File too large" in later
    assert f"the last good checkpoint is iteration 2 ({ckpt / 'iter_0000002'})" in later
    assert files() == before  # iteration 2 and the pointer untouched, no debris left
