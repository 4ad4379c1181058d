"""The depth sweep's grid mode (spannorm_megatron/lab/grid/) on a tiny grid: a finished run
lands in the results table, a second start resumes without redoing it, and an unknown factor or
a grid over its declared budget is refused before anything is prepared or trained."""

import csv
import json
import os
import sys

import pytest

from spannorm_megatron.lab import grid as lab_grid

BASE = """
normalization: RMSNorm
position-embedding-type: rope
swiglu: true
disable-bias-linear: true
untie-embeddings-and-output-weights: true
hidden-dropout: 0.0
attention-dropout: 0.0
adam-beta2: 0.95
lr-decay-style: cosine
num-workers: 0
tokenizer-type: SentencePieceTokenizer
max-position-embeddings: 32
hidden-size: 32
num-attention-heads: 2
ffn-hidden-size: 64
seq-length: 32
micro-batch-size: 2
global-batch-size: 2
train-iters: 6
lr: 2.0e-3
min-lr: 2.0e-4
lr-warmup-iters: 2
log-interval: 2
eval-interval: 6
eval-iters: 1
split: "90,10,0"
transformer-impl: local
"""


def write_grid(tmp_path, cells="[{tokenizer: bytes}]", budget_hours=1, max_run_minutes=5,
               placements="[spannorm]", extra="", groups=""):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "grid.yaml").write_text(f"""
base_config: base.yaml
budget_hours: {budget_hours}
max_run_minutes: {max_run_minutes}
threads: 1
corpus_max_bytes: 300000
estimate: {{startup_s: 10, step_s_per_layer: 0.01}}
rms_every: 3
{extra}
groups:
  - name: tiny
    placements: {placements}
    depths: [2]
    seeds: [7]
    cells: {cells}
{groups}""")
    return str(tmp_path / "grid.yaml")


@pytest.mark.slow
def test_run_resume_and_table(tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("The held-out text is prose, not Python: é € ✓.\n" * 200,
                       encoding="utf-8")
    second = """  - name: second
    placements: [postnorm]
    depths: [2]
    seeds: [7]
    cells: [{tokenizer: bytes}]
"""
    path = write_grid(tmp_path, extra=f"heldout: {{text: {heldout}, max_bytes: 4000}}",
                      groups=second)
    out = str(tmp_path / "out")
    rows = lab_grid.run_grid(path, out, python=sys.executable, log=lambda m: None,
                             groups=["tiny"])
    assert [r["name"] for r in rows] == ["spannorm_L2_s7_tokenizer-bytes"]
    row = rows[0]
    assert row["status"] == "ok", open(os.path.join(out, "runs", row["name"], "train.log")).read()
    assert row["tokenizer"] == "bytes" and row["vocab_size"] == 257
    assert row["final_train_loss"] is not None and row["final_valid_loss"] is not None
    assert row["valid_bits_per_byte"] is not None
    assert row["layer_grad_ratio_min"] is not None and row["max_grad_norm"] is not None
    assert row["projection_rms"]["iterations"] == [3, 6]
    assert row["proj_rms_attn_final"] > 0
    assert row["signals"]["iterations"] and row["signals"]["2/grad_norm"]
    # The output layer's share of the clipped step: its norm is part of the global one.
    logged = [(o, t) for o, t in zip(row["signals"]["output_layer/grad_norm"],
                                     row["signals"]["total/grad_norm"]) if o is not None]
    assert logged and all(0 < o < t for o, t in logged)
    # tools/evaluate.py on the last checkpoint, on the first 4000 bytes (cut at a line end)
    assert row["heldout"]["bytes"] <= 4000 and row["heldout"]["tokens"] > 3000
    assert row["heldout_bits_per_byte"] == row["heldout"]["bits_per_byte"]
    assert 0 < row["heldout_bits_per_byte"] < 10 and row["heldout_loss"] > 0
    assert not os.path.isdir(os.path.join(out, "runs", row["name"], "checkpoints"))
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [row["name"]] and table[0]["status"] == "ok"
    assert float(table[0]["heldout_bits_per_byte"]) == pytest.approx(row["heldout_bits_per_byte"],
                                                                    rel=1e-5)
    with open(os.path.join(out, "results.jsonl")) as f:
        assert len(f.readlines()) == 1

    # Resume: the finished run is kept, nothing trains again.
    again = lab_grid.run_grid(path, out, python=sys.executable, log=lambda m: None,
                              groups=["tiny"])
    assert again == []
    with open(os.path.join(out, "results.jsonl")) as f:
        assert len(f.readlines()) == 1
    assert "spannorm" in lab_grid.summarize(lab_grid.read_results(
        os.path.join(out, "results.jsonl")))
    with pytest.raises(lab_grid.GridError, match="--groups third: no such group.*tiny, second"):
        lab_grid.run_grid(path, out, python=sys.executable, log=lambda m: None,
                          groups=["third"])

    # A second worker runs the other group into its own directory; the export merges both.
    out_b = str(tmp_path / "out_b")
    (other,) = lab_grid.run_grid(path, out_b, python=sys.executable, log=lambda m: None,
                                 groups=["second"])
    assert other["name"] == "postnorm_L2_s7_tokenizer-bytes" and other["status"] == "ok"
    exported = lab_grid.export_results([out, out_b], str(tmp_path / "snapshot"))
    assert exported[0].endswith("results.jsonl.gz")
    snaps = lab_grid.read_results(exported[0])
    assert [s["name"] for s in snaps] == [row["name"], other["name"]]
    snap = snaps[0]
    assert snap["name"] == row["name"] and snap["proj_init_std"] == pytest.approx(0.02 / 2 ** 0.5, rel=1e-5)
    assert exported[1].endswith("summary.md")
    figures = {os.path.basename(p) for p in exported[2:]}
    assert {"grid_deepest_bits_per_byte.png", "grid_grad_ratio.png", "grid_depth.png",
            "grid_output_layer_share.png"} <= figures  # no base / forward cell: no RMS figure
    assert all(os.path.getsize(p) > 1000 for p in exported[2:])
    # One compressed table per export (no CSV twin), overwritten in place: exporting the same
    # rows again gives the same bytes.
    assert sorted(os.listdir(tmp_path / "snapshot")) == sorted(
        os.path.basename(p) for p in exported)
    with open(exported[0], "rb") as f:
        first = f.read()
    assert lab_grid.export_results([out, out_b], str(tmp_path / "snapshot"))[0] == exported[0]
    with open(exported[0], "rb") as f:
        assert f.read() == first


def test_unknown_factor_refused_before_anything(tmp_path):
    path = write_grid(tmp_path, cells="[{vocabulary: bytes}]")
    out = tmp_path / "out"
    with pytest.raises(lab_grid.GridError, match="unknown factor 'vocabulary'.*tokenizer"):
        lab_grid.run_grid(path, str(out), python=sys.executable, log=lambda m: None)
    assert not out.exists()
    path = write_grid(tmp_path, cells="[{scale_mode: backward}]")
    with pytest.raises(lab_grid.GridError, match="no level 'backward'.*init, forward"):
        lab_grid.load_grid(path)


def test_over_budget_refused_before_anything(tmp_path):
    path = write_grid(tmp_path, cells="[{}, {tokenizer: bytes}, {lr: 1.0e-3}]",
                      budget_hours=0.001)
    out = tmp_path / "out"
    with pytest.raises(lab_grid.GridError, match="over its declared budget_hours 0.001"):
        lab_grid.run_grid(path, str(out), python=sys.executable, log=lambda m: None)
    assert not out.exists()
    path = write_grid(tmp_path, cells="[{train_iters: 100000}]")
    with pytest.raises(lab_grid.GridError, match="over the declared max_run_minutes"):
        lab_grid.run_grid(path, str(out), python=sys.executable, log=lambda m: None)
    assert not out.exists()


def test_cli_error_is_one_line(tmp_path, capsys):
    path = write_grid(tmp_path, cells="[{colour: red}]")
    assert lab_grid.main(["--grid", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown factor 'colour'" in err


def test_cells_a_placement_cannot_run_are_left_out(tmp_path):
    path = write_grid(tmp_path, cells="[{}, {scale_mode: forward}]",
                      placements="[prenorm, spannorm]")
    grid = lab_grid.load_grid(path)
    assert [r.name for r in grid.runs] == [
        "prenorm_L2_s7_base", "spannorm_L2_s7_base", "spannorm_L2_s7_scale-mode-forward"]
    assert [r.name for r, _ in grid.not_applicable] == ["prenorm_L2_s7_scale-mode-forward"]
    assert [r.index for r in grid.runs] == [0, 1, 3]


def test_missing_heldout_text_refused_before_anything(tmp_path):
    path = write_grid(tmp_path, extra=f"heldout: {{text: {tmp_path / 'none.txt'}}}")
    with pytest.raises(lab_grid.GridError, match="heldout text .*none.txt' does not exist"):
        lab_grid.load_grid(path)
    path = write_grid(tmp_path, extra="heldout: some.txt")
    with pytest.raises(lab_grid.GridError, match="`heldout` is a mapping"):
        lab_grid.load_grid(path)


def test_summary_pools_a_setting_over_the_groups_that_ran_it():
    # A cell's seed 1234 ran in one group and seeds 1235/1236 in another: one setting, n = 3.
    def row(group, seed, loss, ratio, index):
        return {"name": f"spannorm_L128_s{seed}_tokenizer-sp512", "group": group, "index": index,
                "cell": "tokenizer=sp512", "depth": 128, "placement": "spannorm", "seed": seed,
                "status": "ok", "final_valid_loss": loss, "layer_grad_ratio_min": ratio,
                "heldout_bits_per_byte": loss + 0.5}
    rows = [row("factors", 1234, 4.0, 0.05, 0), row("confirm", 1235, 5.0, 1e-6, 1),
            row("confirm", 1236, 6.0, 0.02, 2)]
    (line,) = [l for l in lab_grid.summarize_by_setting(rows).splitlines()
               if l.startswith("| tokenizer=sp512")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:5] == ["tokenizer=sp512", "128", "spannorm", "3", "1234,1235,1236"]
    assert float(cells[5]) == pytest.approx(5.0)                  # mean
    assert float(cells[6]) == pytest.approx((2 / 3) ** 0.5, rel=1e-2)  # population sd
    assert (cells[7], cells[8]) == ("4", "6")
    assert cells[9] == "1 of 3"   # only seed 1235 fell below the collapse alarm's 1e-3
    assert cells[10] == "5.5 (3)"


def test_docs_keep_markdown_figures_and_one_compressed_table_per_study():
    """docs/stability/ carries results, not raw data: Markdown, figures and one compressed table
    per study (no CSV or JSON twins beside it), and one mechanism.md."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "stability")
    tables = {}
    for folder, _, names in os.walk(root):
        for name in names:
            assert name.endswith((".md", ".png", ".gz")), os.path.join(folder, name)
            if name.endswith(".gz"):
                tables.setdefault(folder, []).append(name)
    assert tables and all(len(names) == 1 for names in tables.values()), tables
    mechanism_docs = [os.path.join(f, n) for f, _, ns in os.walk(root) for n in ns
                      if n == "mechanism.md"]
    assert mechanism_docs == [os.path.join(root, "mechanism.md")]
