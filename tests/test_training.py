"""The training stack end to end: data prepared by our tools, `spannorm-train` under torchrun.

One small corpus (a slice of the embedded default corpus, conftest.py's `corpus`) serves all.
Runs of one rank train in this process (`train_in_process`: no interpreter start-up); the small
2-rank jobs share one torchrun launch (`two_rank_jobs`), each test reading its own jobs.
"""

import dataclasses
import json
import math
import os
import shutil

import pytest
import torch

import launch
from _training import SMALL, logged_losses, run_train, train_in_process, train_jobs
from launch import ROOT
from spannorm_megatron.model.partition import check_model_fits_layout
from spannorm_megatron.training.arguments import parse_args

EXAMPLE_CONFIGS = sorted(os.listdir(os.path.join(ROOT, "examples", "configs")))


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_example_configs_describe_valid_models_and_layouts(name):
    job = parse_args(["--config", os.path.join(ROOT, "examples", "configs", name)])
    check_model_fits_layout(dataclasses.replace(job.model, vocab_size=32768), job.parallel)


def test_main_job_configuration_trains_on_two_ranks(corpus, tmp_path, torchrun):
    data, tokenizer = corpus
    result = run_train(
        "--config", os.path.join(ROOT, "examples", "configs", "quickstart.yaml"),
        "--data-path", data, "--tokenizer-model", tokenizer,
        "--train-iters", "60", "--log-interval", "10", "--eval-interval", "30",
        "--eval-iters", "2", "--split", "90,10,0", "--tensor-model-parallel-size", "2", "--sequence-parallel",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    losses = logged_losses(result.stdout)
    assert sorted(losses) == [10, 20, 30, 40, 50, 60]
    assert losses[60] < losses[10] - 0.5, losses
    assert "validation loss at iteration 60" in result.stdout
    # Quiet: no rank (nor the checkpoint writers it spawns) repeats upstream warnings that tell
    # the user nothing (Transformer Engine / Apex absent, deprecated cuda_graph_scope).
    assert "Warning" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("> fused kernels: Transformer Engine no, Apex no") == 1


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--data-path", "/nonexistent/prefix"], "/nonexistent/prefix"),
        (["--global-batch-size", "6", "--micro-batch-size", "4"],
         "--global-batch-size 6 is not divisible by --micro-batch-size 4"),
        (["--tokenizer-model", "/nonexistent/tok.model"], "/nonexistent/tok.model"),
    ],
)
def test_bad_input_is_refused_before_training(corpus, flags, expected):
    data, tokenizer = corpus
    base = {"--data-path": data, "--tokenizer-model": tokenizer}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    argv = [*SMALL, *(item for pair in base.items() for item in pair), "--train-iters", "2",
            "--lr-warmup-iters", "0"]
    result = train_in_process(*argv)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert "iteration" not in result.stdout


def tensorboard_scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"]}, events.Tags()["tensors"]


def _eight_iterations(corpus, root) -> list:
    """SMALL for 8 iterations, saving to and resuming from `root`/stopped."""
    data, tokenizer = corpus
    return ["--data-path", data, "--tokenizer-model", tokenizer, *SMALL, "--train-iters", "8",
            "--save", root / "stopped", "--load", root / "stopped"]


def _stop_and_resume_jobs(corpus, root) -> dict:
    """`whole`: 8 iterations (saving nothing); `stopped`: the same run stopped after 4
    (--exit-interval), which the test resumes in a fresh launch of its own."""
    common = _eight_iterations(corpus, root)
    return {"whole": {"flags": [*common[:-4], "--tensorboard-dir", root / "tb-whole"]},
            "stopped": {"flags": [*common, "--exit-interval", "4",
                                  "--tensorboard-dir", root / "tb-stopped"]}}


def test_stopped_and_resumed_run_logs_the_same_losses_bitwise(corpus, two_rank_jobs,
                                                             megatron_world, torchrun):
    import _megatron_loader as M

    results, root = two_rank_jobs
    _succeeded(results, "whole", "stopped")
    ckpt = root / "stopped"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    # What Megatron-LM's load_checkpoint would resume from (EP 1: RNG per (pp, tp) position).
    view = M.read(str(ckpt))
    assert M.missing_arguments(view.args) == []
    global_batch = int(SMALL[SMALL.index("--global-batch-size") + 1])
    assert (view.iteration, view.args.consumed_train_samples, view.args.data_parallel_size) == \
        (4, 4 * global_batch, 2)
    entries = M.read_rng(view, expert_model_parallel_size=1)
    assert list(entries) == [(0, 0)] and M.rng_entry_problems(entries[(0, 0)]) == []
    # The resume is a process of its own: whatever a checkpoint fails to carry is gone there.
    second = run_train(*_eight_iterations(corpus, root), "--tensorboard-dir", root / "tb-resumed")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "successfully loaded checkpoint" in second.stdout

    expected = tensorboard_scalars(root / "tb-whole")[0]["lm loss"]
    resumed = {**tensorboard_scalars(root / "tb-stopped")[0]["lm loss"],
               **tensorboard_scalars(root / "tb-resumed")[0]["lm loss"]}
    assert sorted(expected) == list(range(1, 9))
    assert resumed == expected  # float32 values, compared exactly


def distributed_optimizer_flags(corpus):
    """SMALL for 6 iterations on DP2 with the distributed optimizer."""
    data, tokenizer = corpus
    return ["--data-path", data, "--tokenizer-model", tokenizer, *SMALL, "--train-iters", "6",
            "--use-distributed-optimizer"]


def _distributed_optimizer_jobs(corpus, root) -> dict:
    """`plain`: one uninterrupted `distributed_optimizer_flags` run, logged every 5 iterations
    and evaluated at 4 and 6 (evaluation changes no weight), checkpoint `plain` and TensorBoard
    `tb-plain`: what the overlap job is compared with and what the resume continues. `overlap`:
    the same with --overlap-grad-reduce --overlap-param-gather. `tp1_stopped` stops at 3 and
    `tp2_resumed` resumes it with TP2 and sequence parallelism."""
    common = distributed_optimizer_flags(corpus)
    logged = [*common, "--log-interval", "5", "--eval-interval", "4"]
    return {
        "plain": {"flags": [*logged, "--save", root / "plain",
                            "--tensorboard-dir", root / "tb-plain"]},
        "overlap": {"flags": [*logged, "--overlap-grad-reduce", "--overlap-param-gather",
                              "--ddp-bucket-size", "20000", "--save", root / "overlap",
                              "--tensorboard-dir", root / "tb-overlap"]},
        "tp1_stopped": {"flags": [*common, "--save", root / "tp1", "--exit-interval", "3"]},
        "tp2_resumed": {"flags": [*common, "--load", root / "tp1",
                                  "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--tensorboard-dir", root / "tb-tp2"]},
    }


@pytest.fixture(scope="module")
def two_rank_jobs(corpus, torchrun, tmp_path_factory):
    """(results by job name, their folder): every small 2-rank job of this module, in order,
    in one launch (`_training.train_jobs`; a launch costs about as much as four such jobs)."""
    root = tmp_path_factory.mktemp("two_rank_jobs")
    jobs = {**_stop_and_resume_jobs(corpus, root),
            **_distributed_optimizer_jobs(corpus, root), **_tensorboard_job(corpus, root),
            **_throughput_job(corpus, root), **_same_seed_jobs(corpus),
            **_deepseek_job(corpus, root)}
    return train_jobs(jobs, root / "launch"), root


def _succeeded(results, *names):
    for name in names:
        assert results[name].returncode == 0, (name, results[name].stderr[-4000:])


def test_resume_under_another_tensor_parallel_size_continues_the_loss(two_rank_jobs):
    results, root = two_rank_jobs
    _succeeded(results, "plain", "tp1_stopped", "tp2_resumed")
    expected = tensorboard_scalars(root / "tb-plain")[0]["lm loss"]
    resumed = tensorboard_scalars(root / "tb-tp2")[0]["lm loss"]
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(expected[step], rel=1e-4), step


# Spelled out: the tests below rely on them (no biases, untied output layer, RoPE: every
# embedding row's gradient comes from its tokens alone), whatever the defaults become.
EXPLICIT_MODEL = ["--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
                  "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                  "--hidden-dropout", "0", "--attention-dropout", "0"]
MEGATRON_TWINNED = ["learning-rate", "batch-size", "lm loss", "loss-scale", "world-size",
                    "grad-norm", "num-zeros", "params-norm"]


def _tensorboard_job(corpus, root) -> dict:
    data, tokenizer = corpus
    return {"tags": {"flags": [
        "--data-path", data, "--tokenizer-model", tokenizer, *SMALL, *EXPLICIT_MODEL,
        "--num-experts", "4", "--train-iters", "6", "--log-interval", "3",
        "--tensorboard-log-interval", "2", "--eval-interval", "3", "--use-distributed-optimizer",
        "--log-params-norm", "--log-num-zeros-in-grad", "--log-throughput",
        "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--log-memory-to-tensorboard", "--log-world-size-to-tensorboard",
        "--moe-per-layer-logging", "--save", root / "tags", "--tensorboard-dir", root / "tb-tags"],
        "record_tokens": root / "tokens"}}


def test_tensorboard_has_megatron_lm_tags_on_their_schedules(two_rank_jobs):
    """A 2-rank MoE run (DP2, distributed optimizer) with every logging flag: Megatron-LM's
    tags with its names, each '... vs samples' twin on the consumed-samples axis, on its
    schedule (--tensorboard-log-interval 2, --log-interval 3, MoE losses every iteration),
    our own tags beside them; params-norm is the norm of the checkpoint's weights, num-zeros
    the embedding rows no input token of the step touched (hidden x (vocab - distinct tokens
    over both ranks), recorded by tests/_instrumented_train.py)."""
    from spannorm_megatron.hf.megatron_reader import load_megatron_state

    results, root = two_rank_jobs
    _succeeded(results, "tags")
    result, ckpt = results["tags"], root / "tags"
    scalars, tensors = tensorboard_scalars(root / "tb-tags")
    samples = {i: 8 * i for i in range(1, 7)}  # global batch 8

    every_2, every_3 = [2, 4, 6], [3, 6]
    expected = {tag: every_2 for tag in MEGATRON_TWINNED}
    expected.update({f"{tag} vs samples": [samples[i] for i in every_2]
                     for tag in MEGATRON_TWINNED})
    expected.update({"mem-allocated-bytes": every_2, "mem-max-allocated-bytes": every_2,
                     "iteration-time": every_3, "throughput": every_3,
                     "lm loss validation": every_3, "lm loss validation ppl": every_3,
                     "lm loss validation vs samples": [24, 48],
                     "lm loss validation ppl vs samples": [24, 48],
                     "load_balancing_loss": list(range(1, 7)),
                     "moe/load_balancing_loss_layer_0": list(range(1, 7)),
                     "moe/load_balancing_loss_layer_1": list(range(1, 7)),
                     # ours
                     "throughput/tokens-per-sec": every_3, "throughput/tflops": every_3,
                     "throughput/mfu": every_3, "skipped-iterations": every_3,
                     "moe/expert_load/max_over_mean": every_3})
    for layer in (1, 2):
        expected.update({f"stability/layer_{layer:03d}/{signal}": every_3 for signal in
                         ("output_rms", "attention_rms", "mlp_rms", "grad_norm",
                          "update_ratio")})
        expected.update({f"moe/expert_load/layer_{layer:03d}/expert_{e:03d}": every_3
                         for e in range(4)})
    for tag, steps in expected.items():
        assert tag in scalars, f"missing {tag}; have {sorted(scalars)}"
        assert sorted(scalars[tag]) == steps, tag
        assert all(math.isfinite(v) for v in scalars[tag].values()), tag
    for tag in MEGATRON_TWINNED:
        assert [scalars[tag][i] for i in every_2] == [
            scalars[f"{tag} vs samples"][samples[i]] for i in every_2], tag
    assert any(t.startswith("config") for t in tensors)

    assert set(scalars["world-size"].values()) == {2}
    assert set(scalars["batch-size"].values()) == {8}
    # Megatron-LM logs the learning rate after the step's scheduler update: the warm-up of 2
    # steps reaches --lr 1e-3 after step 2 (step 2 itself ran at 5e-4); cosine ends at 0.
    assert scalars["learning-rate"][2] == pytest.approx(1e-3)
    assert scalars["learning-rate"][6] == pytest.approx(0.0, abs=1e-12)
    assert scalars["lm loss validation ppl"][6] == pytest.approx(
        math.exp(scalars["lm loss validation"][6]), rel=1e-5)

    _, weights = load_megatron_state(str(ckpt))
    norm = math.sqrt(sum(float(w.double().square().sum()) for w in weights.values()))
    assert scalars["params-norm"][6] == pytest.approx(norm, rel=1e-6)

    tokens = [json.loads((root / f"tokens.rank{r}.json").read_text()) for r in (0, 1)]
    vocab, hidden = weights["embedding.word_embeddings.weight"].shape
    for i in every_2:
        distinct = set(tokens[0][str(i)]) | set(tokens[1][str(i)])
        assert scalars["num-zeros"][i] == hidden * (vocab - len(distinct)), i
    line = [l for l in result.stdout.splitlines() if "iteration        6/" in l][0]
    assert f"num zeros: {scalars['num-zeros'][6]}" in line
    assert f"params norm: {scalars['params-norm'][6]:.3f}" in line
    assert "throughput per GPU (TFLOP/s/GPU):" in line


def test_megatron_lm_logging_flags_keep_its_defaults():
    """Megatron-LM core_v0.16.1's defaults (training_config.LoggerConfig and the MoE group)."""
    metrics = parse_args(SMALL).metrics
    assert metrics.tensorboard_log_interval == 1 and metrics.tensorboard_queue_size == 1000
    assert metrics.log_loss_scale_to_tensorboard is True
    for flag in ("log_params_norm", "log_num_zeros_in_grad", "log_throughput",
                 "log_timers_to_tensorboard", "log_validation_ppl_to_tensorboard",
                 "log_memory_to_tensorboard", "log_world_size_to_tensorboard",
                 "moe_per_layer_logging"):
        assert getattr(metrics, flag) is False, flag
    assert parse_args([*SMALL, "--no-log-loss-scale-to-tensorboard"]) \
        .metrics.log_loss_scale_to_tensorboard is False


def test_load_refuses_a_checkpoint_of_another_model(corpus, tmp_path):
    data, tokenizer = corpus
    ckpt = tmp_path / "ckpt"
    common = ["--data-path", data, "--tokenizer-model", tokenizer, *SMALL, "--train-iters", "3"]
    saved = train_in_process(*common, "--save", str(ckpt))
    assert saved.returncode == 0, saved.stderr[-4000:]
    before = sorted(p.name for p in ckpt.iterdir())
    for flags, expected in ((["--norm-placement", "postnorm"], "norm_placement"),
                            (["--hidden-size", "128"], "hidden_size"),
                            (["--make-vocab-size-divisible-by", "1024"], "vocab_size")):
        result = train_in_process(*common, "--load", str(ckpt), *flags)
        assert result.returncode == 2, result.stderr[-3000:]
        assert expected in result.stderr and str(ckpt) in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_overlapped_gradient_reduce_and_parameter_gather_change_nothing(two_rank_jobs):
    """--overlap-grad-reduce --overlap-param-gather (distributed optimizer, DP2, small buckets so
    that there are several): the same losses, validation losses and saved weights, bitwise."""
    from spannorm_megatron.hf.megatron_reader import load_megatron_state

    results, root = two_rank_jobs
    _succeeded(results, "plain", "overlap")
    runs = {}
    for name in ("plain", "overlap"):
        scalars = tensorboard_scalars(root / f"tb-{name}")[0]
        runs[name] = (scalars["lm loss"], scalars["lm loss validation"],
                      load_megatron_state(str(root / name))[1])
    (loss, valid, weights), (loss_o, valid_o, weights_o) = runs["plain"], runs["overlap"]
    assert sorted(valid) == [4, 6] and loss_o == loss and valid_o == valid
    assert weights_o.keys() == weights.keys()
    for name in weights:  # the checkpoint holds the update every rank made, gathered
        assert torch.equal(weights_o[name], weights[name]), name


def test_logged_loss_is_token_weighted_and_gradients_follow_the_per_token_flag(tmp_path,
                                                                                torchrun):
    """DP2 x 2 micro-batches whose loss masks keep 16, 3, 9 and 1 tokens per row: the logged
    loss is the token-weighted mean over all of them (computed independently on a second copy
    of the model), the gradient is the mean of micro-batch means by default (Megatron-LM's) and
    the token-weighted one with --calculate-per-token-loss. The logged loss is reduced once per
    step (as Megatron-LM's train_step does) and equals what one all-reduce per micro-batch gave:
    exactly, both summed in float64; within float32 rounding, the old float32 sums."""
    result = torchrun(launch.TESTS / "_loss_worker.py", tmp_path, timeout=300)
    launch.check_launch(result, tmp_path)
    records = launch.rank_results(tmp_path, 2)
    assert records[0] == records[1]
    for mode, gradient_of in (("default", "microbatch_mean"), ("per_token", "token_weighted")):
        record = records[0][mode]
        # The masks differ enough that the two means are told apart.
        assert abs(record["token_weighted"] - record["microbatch_mean"]) > 1e-3
        assert record["logged_loss"] == pytest.approx(record["token_weighted"], rel=1e-6)
        assert record["microbatch_reports"] == 2
        assert record["logged_loss"] == record["per_microbatch_reduction_fp64"]
        assert record["logged_loss"] == pytest.approx(record["per_microbatch_reduction_fp32"],
                                                      rel=2e-7)
        assert record["grad_error"][gradient_of] < 1e-5, record
        other = {"microbatch_mean": "token_weighted", "token_weighted": "microbatch_mean"}
        assert record["grad_error"][other[gradient_of]] > 1e-2, record


def _logged_ms_per_iteration(stdout: str) -> dict:
    times = {}
    for line in stdout.splitlines():
        if "| lm loss:" in line and " iteration " in line:
            iteration = int(line.split(" iteration ")[1].split("/")[0])
            times[iteration] = float(
                line.split("elapsed time per iteration (ms): ")[1].split(" |")[0])
    return times


def _throughput_job(corpus, root) -> dict:
    data, tokenizer = corpus
    return {"throughput": {"flags": [
        *SMALL, "--data-path", data, "--tokenizer-model", tokenizer, "--train-iters", "16",
        "--log-interval", "4", "--eval-interval", "7", "--eval-iters", "40",
        "--save", root / "throughput", "--save-interval", "6"],
        "step_times": root / "step_times.json"}}


def test_throughput_leaves_evaluation_and_checkpoint_time_out(two_rank_jobs):
    """Log every 4 iterations, save at 6 and 12, evaluate at 7 and 14 (40 batches: the time of
    ~13 training steps). Each logged ms/iteration must be the mean of its window's training
    steps, as measured around each `train_step` call (tests/_instrumented_train.py), whatever
    else the machine is doing. Before the fix the time up to a pause was dropped while its
    iterations still counted (window 5-8 read ~1/4 of its steps' mean, 13-16 ~1/2); counting
    the pauses in would read ~4x."""
    results, root = two_rank_jobs
    _succeeded(results, "throughput")
    result, times_file = results["throughput"], root / "step_times.json"
    logged = _logged_ms_per_iteration(result.stdout)
    assert sorted(logged) == [4, 8, 12, 16]
    steps = {int(k): v * 1000 for k, v in json.loads(times_file.read_text()).items()}
    for end in (8, 12, 16):
        window = sum(steps[i] for i in range(end - 3, end + 1)) / 4
        # The logged window also holds the loop's own work between steps (log line, metrics,
        # TensorBoard); it must hold neither pause (~4x) nor drop the time before one (<=0.5x).
        assert 0.7 < logged[end] / window < 1.6, (end, logged, steps)


TEARDOWN_PROBE = """
import signal, sys, torch
from spannorm_megatron.training.arguments import parse_args
from spannorm_megatron.training.trainer import Trainer

before = signal.getsignal(signal.SIGTERM)
try:
    with Trainer(parse_args(sys.argv[1:])) as trainer:
        trainer.setup()
        trainer.train_step()
        raise RuntimeError("boom")
except RuntimeError:
    pass
print("STATE", torch.distributed.is_initialized(), signal.getsignal(signal.SIGTERM) is before,
      trainer.iteration)
"""


@pytest.mark.slow
def test_trainer_tears_down_after_an_error(corpus):
    """An exception inside `with Trainer(...)` still destroys the process groups and gives
    SIGTERM its previous handler back."""
    import subprocess
    import sys

    data, tokenizer = corpus
    result = subprocess.run(
        [sys.executable, "-c", TEARDOWN_PROBE, *SMALL, "--data-path", data,
         "--tokenizer-model", tokenizer, "--train-iters", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STATE False True 1" in result.stdout


def test_fresh_run_refuses_a_save_directory_with_checkpoints(corpus, tmp_path):
    """Without --load a run starts at iteration 0; pointed at another run's checkpoints it would
    replace them and move the pointer back. It is refused before training, files intact."""
    data, tokenizer = corpus
    ckpt = tmp_path / "ckpt"
    common = [*SMALL, "--data-path", data, "--tokenizer-model", tokenizer, "--save", str(ckpt),
              "--save-interval", "2"]
    first = train_in_process(*common, "--train-iters", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    again = train_in_process(*common, "--train-iters", "4")
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"--load {ckpt}" in again.stderr and "latest: iteration 4" in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


@pytest.mark.slow
def test_resume_with_another_schedule_is_refused_unless_told_which_to_keep(corpus, tmp_path):
    """Megatron-LM's rule: a schedule that disagrees with the checkpoint's is refused; megatron-
    core alone would keep the checkpoint's and, with a longer --train-iters, train at lr 0."""
    data, tokenizer = corpus
    ckpt = str(tmp_path / "ckpt")
    common = ["--data-path", data, "--tokenizer-model", tokenizer, *SMALL]
    assert train_in_process(*common, "--save", ckpt, "--train-iters", "4").returncode == 0
    refused = train_in_process(*common, "--save", ckpt, "--load", ckpt, "--train-iters", "8")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--lr-decay-iters (lr_decay_steps: checkpoint " in refused.stderr
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    # Another global batch changes the lengths in samples: named as the cause.
    batch = train_in_process(*common, "--save", ckpt, "--load", ckpt, "--train-iters", "4",
                             "--global-batch-size", "16")
    assert batch.returncode == 2 and "Traceback" not in batch.stderr
    assert "--global-batch-size 16 differs from the checkpoint's 8" in batch.stderr
    assert ("(lr_warmup_steps 16 -> 32; lr_decay_steps 32 -> 64 samples). Resume with "
            "--global-batch-size 8, or pass --override-opt-param-scheduler") in batch.stderr
    assert "--lr-decay-iters" not in batch.stderr

    rates = {}
    for choice in ("--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"):
        save = str(tmp_path / choice)
        shutil.copytree(ckpt, save)
        run = train_in_process(*common, "--save", save, "--load", save, "--train-iters", "8",
                               "--tensorboard-dir", str(tmp_path / f"tb{choice}"), choice)
        assert run.returncode == 0, run.stderr[-3000:]
        rates[choice] = tensorboard_scalars(tmp_path / f"tb{choice}")[0]["learning-rate"]
    assert rates["--override-opt-param-scheduler"][6] > 1e-4  # the new cosine over 8 steps
    assert rates["--use-checkpoint-opt-param-scheduler"][6] == 0.0  # the old one ended at 4


LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "pp2-vpp2": ["--pipeline-model-parallel-size", "2",
                 "--num-layers-per-virtual-pipeline-stage", "1"],
}


SAME_SEED_LAYOUTS = {
    "dense": LAYOUTS,
    # The explicit layout makes 4 virtual stages of one layer each (PP2 x VPP2).
    "moe": {"ep1": [], "ep2": ["--expert-model-parallel-size", "2"], "pp2": LAYOUTS["pp2"],
            "pp2-layout": ["--pipeline-model-parallel-size", "2",
                           "--pipeline-model-parallel-layout", "Et|t|t|tL"]},
}


def _same_seed_jobs(corpus) -> dict:
    data, tokenizer = corpus
    common = ["--data-path", data, "--tokenizer-model", tokenizer, *SMALL, "--num-layers", "4",
              "--train-iters", "3", "--log-interval", "1"]
    moe = ["--num-experts", "4", "--moe-router-topk", "2"]
    return {f"seed-{kind}-{name}": {"flags": [*common, *(moe if kind == "moe" else []), *flags]}
            for kind, layouts in SAME_SEED_LAYOUTS.items() for name, flags in layouts.items()}


@pytest.mark.parametrize("kind", SAME_SEED_LAYOUTS)
def test_the_same_seed_gives_the_same_model_on_every_layout(two_rank_jobs, kind):
    """The first loss is the initial model's: equal on every layout (to float rounding) because
    every weight is drawn from (seed, its place in the model), whichever rank builds it."""
    results, _ = two_rank_jobs
    first = {}
    for name in SAME_SEED_LAYOUTS[kind]:
        _succeeded(results, f"seed-{kind}-{name}")
        first[name] = logged_losses(results[f"seed-{kind}-{name}"].stdout)[1]
    reference = next(iter(first.values()))
    assert all(abs(loss - reference) < 5e-6 for loss in first.values()), first


@pytest.mark.slow
def test_resume_with_another_tokenizer_of_the_same_size_is_refused(corpus, tmp_path):
    """The run record keeps the tokenizer's checksum; ids of another tokenizer would load
    without a word and mean other text."""
    from _training import prepare_corpus

    data, tokenizer = corpus
    _, other = prepare_corpus(tmp_path, max_bytes=200_000, name="other", tokenizer="other")
    ckpt = str(tmp_path / "ckpt")
    common = ["--data-path", data, *SMALL, "--save", ckpt, "--load", ckpt, "--train-iters", "3"]
    assert train_in_process(*common, "--tokenizer-model", tokenizer).returncode == 0
    refused = train_in_process(*common, "--tokenizer-model", other)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "the checkpoint was trained with another tokenizer (--tokenizer-model: " in \
        refused.stderr
    assert f"its file was {tokenizer}" in refused.stderr


def _deepseek_job(corpus, root) -> dict:
    data, tokenizer = corpus
    return {"deepseek": {"flags": [
        "--config", os.path.join(ROOT, "examples", "configs", "spannorm_moe_deepseek_cpu.yaml"),
        "--data-path", data, "--tokenizer-model", tokenizer, "--train-iters", "4",
        "--log-interval", "1", "--eval-interval", "1000", "--lr-warmup-iters", "1",
        "--moe-per-layer-logging", "--tensorboard-dir", root / "tb-deepseek"]}}


def test_deepseek_style_recipe_trains_on_two_expert_parallel_ranks(two_rank_jobs):
    """The CPU recipe of examples/configs (dense first layer, sigmoid + expert bias, group
    routing, shared expert, q/k norms, z-loss, EP2) trains, with the per-MoE-layer
    TensorBoard tags: expert load, z-loss, expert bias (moved by +-rate per step: a sign rule,
    so it may also swing back to 0)."""
    results, root = two_rank_jobs
    _succeeded(results, "deepseek")
    losses = logged_losses(results["deepseek"].stdout)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    scalars, _ = tensorboard_scalars(root / "tb-deepseek")
    for layer in (2, 3, 4):  # layer 1 is dense
        assert f"moe/expert_load/layer_{layer:03d}/expert_000" in scalars
        assert f"moe/z_loss_layer_{layer - 1}" in scalars
        assert f"moe/seq_load_balancing_loss_layer_{layer - 1}" in scalars
        rate = 1e-3  # the recipe's --moe-router-bias-update-rate
        for step in range(1, 5):
            bias = [scalars[f"moe/expert_bias/layer_{layer:03d}/expert_{e:03d}"][step]
                    for e in range(8)]
            steps = [b / rate for b in bias]
            assert all(abs(k - round(k)) < 1e-3 and abs(round(k)) <= step for k in steps), bias
            if step == 1:  # counts differ at init: every expert moved
                assert all(round(abs(k)) == 1 for k in steps), bias
    assert "moe/expert_load/layer_001/expert_000" not in scalars
    assert set(scalars["moe/z_loss_layer_0"].values()) == {0.0}  # dense: 0, as Megatron-LM


def test_eval_iters_0_trains_without_evaluating(corpus, tmp_path):
    data, tokenizer = corpus
    result = train_in_process("--data-path", data, "--tokenizer-model", tokenizer, *SMALL,
                              "--train-iters", "3", "--eval-iters", "0", "--eval-interval", "1",
                              "--tensorboard-dir", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(logged_losses(result.stdout)) == [1, 2, 3]
    assert "validation loss" not in result.stdout


def test_no_load_optim_says_the_schedule_starts_afresh(tmp_path):
    """As in Megatron-LM, --no-load-optim leaves the scheduler's state behind with the
    optimizer's: the run says so, with the iteration it goes on from."""
    from fuzz_train import BASE

    save = str(tmp_path / "ckpt")
    first = train_in_process(*BASE, "--train-iters", "2", "--save", save)
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = train_in_process(*BASE, "--train-iters", "3", "--save", save, "--load", save,
                               "--no-load-optim")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("--no-load-optim: the optimizer and the learning-rate schedule start afresh (warm-up "
            "and decay from step 0) while the iteration count goes on from 2") in resumed.stdout


def test_a_split_without_validation_says_that_nothing_is_evaluated(corpus):
    prefix, tokenizer = corpus
    result = train_in_process(*SMALL, "--data-path", prefix, "--tokenizer-model", tokenizer,
                              "--train-iters", "3", "--split", "100,0,0", "--eval-iters", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("WARNING: --split 100,0,0 leaves nothing for validation: this run evaluates nothing"
            in result.stdout)
