"""The stability lab: signal propagation at depth, its CLI, and the depth-sweep report.

What is checked:
- at 128 layers (hidden 64, sigma = 1/sqrt(hidden)), the gradient reaching layer 2's input stays
  within 10x of the last layer's for SpanNorm with Scale Init, and is off by orders of magnitude
  for SpanNorm and PostNorm without it (the paper's theory, measured by the lab's own probe);
- tools/signal_propagation.py writes its CSV/JSON/PNG files, and refuses bad input clearly;
- the depth-sweep report's parser and verdicts (final losses, divergence, spikes) on synthetic
  logs with known answers, and on a tiny real sweep through examples/depth_sweep/run.sh, where
  the log parser must agree with the run's TensorBoard events.
"""

import csv
import dataclasses
import json
import math
import os
import sys

import pytest

import launch
from _training import STRICT_DEVICES
from launch import ROOT

from spannorm_megatron.lab.batch import make_batch
from spannorm_megatron.lab.propagation import (
    LAYER_SIGNALS,
    ProbeResult,
    ProbeSettings,
    build_probe_model,
    grad_ratio,
    model_config,
    probe,
)
from spannorm_megatron.lab.results import summarize_result
from spannorm_megatron.lab.training_log import (
    find_spikes,
    judge,
    parse_log_text,
    read_tensorboard,
)

HIDDEN = 64


# ---------------------------------------------------------------- signal propagation at depth
@pytest.fixture(scope="module")
def deep_batch():
    return make_batch("random", batch_size=2, seq_length=16, seed=0, vocab_size=128)


def _grad_spread_at_init(placement, scale_init, batch, depth=128):
    settings = ProbeSettings(hidden_size=HIDDEN, num_attention_heads=4)
    config = model_config(placement, depth, scale_init, settings, batch.vocab_size,
                          batch.tokens.shape[1])
    assert config.init_method_std == pytest.approx(1 / math.sqrt(HIDDEN))
    model = build_probe_model(config, seed=1234)
    measured, _ = probe(model, batch, train_steps=(0,))
    _loss, layers = measured[0]
    result = ProbeResult(placement, depth, scale_init, scale_init, 0.0, 0, _loss, layers)
    assert len(layers["input_grad_norm"]) == depth
    assert all(math.isfinite(v) and v > 0 for v in layers["input_grad_norm"])
    ratio = grad_ratio(result)
    print(f"{placement} scale_init={scale_init} L={depth}: "
          f"|grad at layer 2 input| / |grad at layer {depth} input| = {ratio:.3g}")
    return max(ratio, 1 / ratio), layers


def test_spannorm_with_scale_init_keeps_gradients_within_10x_at_128_layers(seeded, deep_batch):
    spread, layers = _grad_spread_at_init("spannorm", "sqrt_depth", deep_batch)
    assert spread < 10
    # SpanNorm's N2 ends every layer: the stream stays at RMS ~1 (the gains start at 1).
    assert all(v == pytest.approx(1.0, rel=0.05) for v in layers["output_rms"])


@pytest.mark.parametrize("placement", ["spannorm", "postnorm"])
def test_without_scale_init_gradients_change_by_orders_of_magnitude(seeded, deep_batch,
                                                                     placement):
    spread, _ = _grad_spread_at_init(placement, "none", deep_batch)
    assert spread > 1e3


def test_probe_signals_are_consistent(seeded, deep_batch):
    """Cheap cross-checks of the per-layer signals on a short model, and training."""
    settings = ProbeSettings(hidden_size=32, num_attention_heads=4)
    config = model_config("prenorm", 3, "megatron", settings, deep_batch.vocab_size, 16)
    model = build_probe_model(config, seed=1234)
    measured, (losses, grad_norms) = probe(model, deep_batch, train_steps=(0, 3), lr=3e-3)
    assert sorted(measured) == [0, 3]
    assert len(losses) == 4 and losses[3] < losses[0]
    assert measured[0][0] == pytest.approx(losses[0]) and measured[3][0] == losses[3]
    layers = measured[0][1]
    assert set(layers) == set(LAYER_SIGNALS)
    # PreNorm adds branches to the stream: consecutive outputs are similar but not equal.
    assert all(0 < c < 1 for c in layers["cosine_prev"])
    assert all(-1 <= c <= 1 for c in layers["token_cosine"])
    # Same seed, same model: the measurement is deterministic.
    again, _ = probe(build_probe_model(config, seed=1234), deep_batch, train_steps=(0,))
    assert again[0][1]["input_grad_norm"] == layers["input_grad_norm"]


def test_summary_row_of_a_known_result():
    layers = {s: [1.0, 1.0, 1.0, 1.0] for s in LAYER_SIGNALS}
    layers["input_grad_norm"] = [50.0, 0.02, 0.5, 1.0]
    layers["output_rms"] = [1.0, 2.0, 4.0, 8.0]
    layers["cosine_prev"] = [0.1, 0.5, 0.7, 0.9]
    row = summarize_result(ProbeResult("spannorm", 4, "none", "none", 0.1, 0, 3.0, layers))
    assert row["grad_in_2_over_L"] == pytest.approx(0.02)
    assert row["grad_spread"] == pytest.approx(50.0) and row["bounded_10x"] is False
    assert row["output_rms_max_over_min"] == pytest.approx(8.0)
    assert row["cosine_prev_mean"] == pytest.approx(0.7)  # layers 2..L
    assert row["finite"] is True
    layers["mlp_rms"][2] = math.nan
    assert summarize_result(ProbeResult("spannorm", 4, "none", "none", 0.1, 0, 3.0,
                                        layers))["finite"] is False


# ---------------------------------------------------------------- the tool's CLI
@pytest.mark.slow
def test_cli_writes_csv_json_and_png(tmp_path):
    out = tmp_path / "sigprop"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "signal_propagation.py"),
           "--placements", "spannorm,postnorm", "--depths", "2", "3",
           "--scale-init", "sqrt_depth", "none", "--hidden-size", "32", "--seq-length", "8",
           "--batch-size", "2", "--tokens", "random", "--train-steps", "1", "--out", str(out)]
    result = launch.run(cmd, timeout=300, env=STRICT_DEVICES)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "[  8/8]" in result.stdout

    with open(out / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 placements x (2 + 3 layers) x 2 inits x 2 measurements (init, after 1 step)
    assert len(rows) == 2 * 5 * 2 * 2
    assert set(rows[0]) == {"placement", "depth", "scale_init", "step", "layer",
                            *LAYER_SIGNALS}
    assert {r["step"] for r in rows} == {"0", "1"}
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 16
    doc = json.loads((out / "signals.json").read_text())
    assert doc["meta"]["tokens"].startswith("random tokens")
    assert len(doc["summary"]) == 16 and len(doc["results"]) == 16
    assert len(doc["training"]) == 8 and len(doc["training"][0]["loss"]) == 2
    assert "layer 2's input" in (out / "summary.md").read_text()

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 2 * len(LAYER_SIGNALS) + 2  # per signal and step, grad ratio, loss
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000, name

    # The docs' copy: the Markdown, the plots and one compressed table with every per-layer
    # value, from which the summary comes back the same; written twice, the same bytes.
    from spannorm_megatron.lab.cli import main
    from spannorm_megatron.lab.results import load_json

    docs = tmp_path / "docs"
    assert main(["--from-json", str(out / "signals.json"), "--export", "--out",
                 str(docs)]) == 0
    table = (docs / "signals.json.gz").read_bytes()
    assert sorted(p.name for p in docs.iterdir()) == sorted(["signals.json.gz", "summary.md",
                                                             *pngs])
    assert (docs / "summary.md").read_text() == (out / "summary.md").read_text()
    for source in (out / "signals.json", docs / "signals.json.gz"):  # the plots drawn once
        assert main(["--from-json", str(source), "--export", "--out", str(docs),
                     "--no-plots"]) == 0
        assert (docs / "signals.json.gz").read_bytes() == table
    assert len(load_json(str(docs / "signals.json.gz")).results) == 16


@pytest.mark.parametrize("argv,expected", [
    (["--placements", "spanorm"], "not a known placement"),
    (["--scale-init", "sqrt"], "--scale-init 'sqrt' is not understood"),
    (["--depths", "1"], "depth 1 must be an integer >= 2"),
    (["--depths", "eight"], "--depths takes integers"),
    (["--hidden-size", "60", "--num-attention-heads", "8"], "not divisible"),
])
def test_cli_refuses_bad_input_with_one_line(argv, expected, capsys):
    from spannorm_megatron.lab.cli import main

    assert main(argv + ["--out", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err


# ---------------------------------------------------------------- depth-sweep report parser
def _line(iteration, loss, grad="0.900", total=40):
    return (f" [2026-01-01 12:00:00] iteration {iteration:8d}/{total:8d} | consumed samples: "
            f"{iteration * 8:12d} | elapsed time per iteration (ms): 120.5 | learning rate: "
            f"1.000000E-03 | global batch size:     8 | lm loss: {loss} | grad norm: {grad} | "
            f"number of skipped iterations:   0 | tokens/s: 4000 |")


def _valid(iteration, loss):
    bar = "-" * 100
    return (f"{bar}\n validation loss at iteration {iteration} | lm loss value: {loss} | "
            f"lm loss PPL: 1.0E+02 | \n{bar}")


def test_spike_rule_is_the_guards_strict_median_after_five():
    """The lab judges logged losses by the training guard's own rule (training.spikes, at the
    defaults of --loss-spike-factor 1.5 and --loss-spike-window 50)."""
    its = list(range(1, 9))
    # median of (5, 4, 3, 2, 1) is 3: 4.5 is exactly 1.5x (no spike), 4.51 is a spike
    assert find_spikes(its, [5, 4, 3, 2, 1, 4.5, 1, 1]) == []
    assert find_spikes(its, [5, 4, 3, 2, 1, 4.51, 1, 1]) == [6]
    # fewer than 5 earlier values: never a spike, however large
    assert find_spikes(its[:5], [1, 100, 1, 100, 1]) == []
    # non-finite losses are not spikes (they are divergence) and do not enter the window;
    # None (n/a) is skipped
    assert find_spikes(its[:4], [1.0, float("nan"), None, float("inf")]) == []
    assert find_spikes(its, [5, 4, float("nan"), 3, 2, 1, None, 4.51]) == [8]
    # the window is the guard's 50, not 5: the median of (9, 8, 7, 6, 5, 1, 1, 1, 1, 1) is 3,
    # so 1.6 is no spike (the last five's median, 1, would make it one) and 4.6 is
    assert find_spikes(range(11), [9, 8, 7, 6, 5, 1, 1, 1, 1, 1, 1.6]) == []
    assert find_spikes(range(11), [9, 8, 7, 6, 5, 1, 1, 1, 1, 1, 4.6]) == [10]
    # the same losses through the guard itself: the same verdicts
    from spannorm_megatron.lab.rules import spike_factor, spike_window
    from spannorm_megatron.training.guards import SpikeDetector

    guard = SpikeDetector(spike_factor(), spike_window())
    losses = [9, 8, 7, 6, 5, 1, 1, 1, 1, 1, 4.6]
    assert [i for i, loss in enumerate(losses) if guard.check(loss) is not None] == [10]


def test_report_parser_on_synthetic_logs():
    healthy = "\n".join(
        ["> model: spannorm, 8 layers", "some warning | with pipes"]
        + [_line(i, f"{8.0 - 0.1 * i:.6E}") for i in range(5, 45, 5)]
        + [_valid(20, "7.100000E+00"), _valid(40, "4.250000E+00")])
    history = parse_log_text(healthy)
    assert history.iterations == list(range(5, 45, 5)) and history.train_iters == 40
    assert history.train_loss[0] == pytest.approx(7.5)
    assert history.grad_norm == [0.9] * 8
    assert history.valid_iterations == [20, 40] and history.valid_loss[-1] == 4.25
    verdict = judge(history, exit_code=0)
    assert verdict.completed and not verdict.diverged
    assert verdict.final_train_loss == pytest.approx(4.0)
    assert verdict.final_valid_loss == 4.25
    assert verdict.first_spike_iteration is None and verdict.num_spikes == 0
    assert verdict.median_step_ms == pytest.approx(120.5)

    spiky = [7.0, 6.0, 5.5, 5.0, 4.8, 4.6, 9.0, 4.5, 4.4, 12.0]
    history = parse_log_text("\n".join(_line(5 * (i + 1), f"{v:.6E}", total=50)
                                       for i, v in enumerate(spiky)))
    verdict = judge(history, exit_code=0)
    # at 35: median(6, 5.5, 5, 4.8, 4.6) = 5.0 -> 9.0 > 7.5; at 50: median(4.8..4.4) = 4.6
    assert verdict.first_spike_iteration == 35 and verdict.num_spikes == 2
    assert verdict.diverged and "above the start" in verdict.diverged_reason  # 12 > 7

    nan_run = "\n".join([_line(5, "8.000000E+00"), _line(10, "NAN", grad="nan"),
                         _line(15, "n/a", grad="n/a"), _valid(15, "nan")])
    verdict = judge(parse_log_text(nan_run), exit_code=0)
    assert verdict.diverged and verdict.first_nonfinite_iteration == 10
    assert verdict.first_spike_iteration is None and verdict.num_spikes == 0  # NaN: diverged
    assert not verdict.completed  # stopped at 15 of 40
    assert judge(parse_log_text(healthy), exit_code=1).completed is False


# ---------------------------------------------------------------- a tiny real sweep
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The files tools/prepare_embedded_data.sh writes, from a 300 kB slice."""
    from _training import prepare_corpus

    root = tmp_path_factory.mktemp("sweep_data")
    prepare_corpus(root, max_bytes=300_000, tokenizer="tokenizer")
    return root


@pytest.mark.slow
def test_depth_sweep_script_and_report_on_a_tiny_real_run(tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    env = {"VENV": os.path.dirname(os.path.dirname(sys.executable)), "SWEEP_DIR": str(sweep),
           "DATA_DIR": str(tiny_data), "PLACEMENTS": "spannorm", "DEPTHS": "2 4", "NPROC": "1"}
    cmd = ["bash", os.path.join(ROOT, "examples", "depth_sweep", "run.sh"),
           "--train-iters", "10", "--lr-warmup-iters", "2", "--log-interval", "1",
           "--eval-interval", "5", "--eval-iters", "1", "--hidden-size", "32",
           "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--ffn-hidden-size", "64", "--split", "80,20,0"]
    result = launch.run(cmd, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("report.md", "report.csv", "report.json", "loss_curves.png"):
        assert (sweep / name).is_file(), name

    doc = json.loads((sweep / "report.json").read_text())
    runs = {(r["placement"], r["depth"]): r for r in doc["runs"]}
    assert set(runs) == {("spannorm", 2), ("spannorm", 4)}
    for (placement, depth), run in runs.items():
        run_dir = sweep / "runs" / f"{placement}_L{depth}"
        assert run["status"] in ("ok", "diverged"), run
        assert run["last_iteration"] == 10 and run["source"] == "log"
        history = run["history"]
        assert history["iterations"] == list(range(1, 11))
        assert history["valid_iterations"] == [5, 10]
        # The log parser agrees with the run's TensorBoard events.
        events = read_tensorboard(str(run_dir / "tensorboard"))
        assert events.iterations == history["iterations"]
        assert history["train_loss"] == pytest.approx(events.train_loss, rel=1e-5)
        assert history["grad_norm"] == pytest.approx(events.grad_norm, abs=1e-3)
        assert history["valid_loss"] == pytest.approx(events.valid_loss, rel=1e-5)
        # The verdict follows from the history by the documented rules.
        losses = history["train_loss"]
        assert run["final_train_loss"] == losses[-1] and run["start_loss"] == losses[0]
        assert run["final_valid_loss"] == history["valid_loss"][-1]
        assert run["diverged"] == (losses[-1] > losses[0])
        spikes = find_spikes(history["iterations"], losses)
        assert run["first_spike_iteration"] == (spikes[0] if spikes else None)
        assert run["max_grad_norm"] == pytest.approx(max(history["grad_norm"]))
        # Per-layer gradient ratio from the run's stability tags, on every logging step.
        assert history["ratio_iterations"] == list(range(1, 11))
        ratios = history["layer_grad_ratio"]
        assert all(r > 0 for r in ratios) and run["layer_grad_ratio_final"] == ratios[-1]
        assert run["layer_grad_ratio_min"] == min(ratios)
    table = (sweep / "report.md").read_text()
    assert "| spannorm | 2 |" in table and "| spannorm | 4 |" in table

    # The docs' copy: report.md, the curves and one compressed table (the JSON, no CSV twin).
    import gzip

    from spannorm_megatron.lab.sweep import main as report_main

    docs = tmp_path / "docs"
    assert report_main([str(sweep), "--export", "--out", str(docs)]) == 0
    assert sorted(p.name for p in docs.iterdir()) == ["loss_curves.png", "report.json.gz",
                                                      "report.md"]
    with gzip.open(docs / "report.json.gz", "rt") as f:
        assert json.load(f) == json.loads((sweep / "report.json").read_text())
    assert (docs / "report.md").read_text() == table

    # A second invocation keeps finished runs and only rewrites the report.
    again = launch.run(cmd, timeout=200, env=env)
    assert again.returncode == 0 and again.stdout.count("finished earlier, kept") == 2


def test_depth_sweep_config_describes_a_valid_model_for_every_placement():
    from spannorm_megatron.model.partition import check_model_fits_layout
    from spannorm_megatron.placements import PLACEMENTS
    from spannorm_megatron.training.arguments import parse_args

    config = os.path.join(ROOT, "examples", "depth_sweep", "config.yaml")
    for placement in PLACEMENTS:
        job = parse_args(["--config", config, "--norm-placement", placement,
                          "--num-layers", "128"])
        check_model_fits_layout(dataclasses.replace(job.model, vocab_size=4096), job.parallel)
