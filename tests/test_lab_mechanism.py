"""lab/mechanism.py: signals read before / at / after the collapse, from grid rows."""

import math
import os

from spannorm_megatron.lab import mechanism

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(name, placement, ratios, mlp_mid, scale_mode="init"):
    iterations = [5, 10, 15, 20, 25]
    return {
        "name": name, "placement": placement, "depth": 128, "cell": "base", "seed": 1,
        "scale_mode": scale_mode, "final_valid_loss": 6.2,
        "history": {"ratio_iterations": iterations, "layer_grad_ratio": ratios},
        "signals": {"iterations": iterations, "mid/mlp_rms": mlp_mid,
                    "mid/output_rms": [1.0] * 5, "1/output_rms": [1.0] * 5,
                    "2/mlp_rms": [0.3] * 5, "2/update_ratio": [1e-2, 1e-2, 1e-3, 1e-5, 1e-6]},
    }


def test_collapse_is_read_at_its_iteration_and_healthy_runs_at_the_median():
    rows = [_row("a", "spannorm", [1.0, 0.5, 1e-5, 1e-7, 1e-8], [0.0, 0.01, 0.05, 0.1, 0.1]),
            _row("b", "spannorm", [1.0, 0.5, 0.1, 1e-4, 1e-6], [0.0, 0.01, 0.02, 0.2, 0.2]),
            _row("c", "spannorm", [1.0, 0.5, 0.3, 0.2, 0.3], [0.0, 0.01, 0.02, 0.03, 0.03]),
            _row("d", "postnorm", [1.0] * 5, [0.0] * 5, scale_mode="forward")]
    runs = {r["name"]: r for r in mechanism.analyse(rows, threshold=1e-3)}
    assert runs["a"]["collapse_iteration"] == 15 and runs["b"]["collapse_iteration"] == 20
    assert runs["a"]["before"]["mid/mlp_rms"] == 0.01 and runs["a"]["at"]["mid/mlp_rms"] == 0.05
    assert runs["a"]["end"]["2/update_ratio"] == 1e-6
    # c never collapses: read at the median collapse iteration of its placement and scale mode
    assert not runs["c"]["collapses"] and runs["c"]["read_at"]["at"] == 17
    assert runs["c"]["at"]["grad_ratio"] == 0.3  # the last logged value at or before 17
    # d: no collapsing run shares its scale mode: the median over all collapses
    assert runs["d"]["read_at"]["at"] == 17
    # N2 input of SpanNorm's layer 2: layer 1's output plus layer 2's MLP branch
    assert math.isclose(runs["a"]["at"]["2/n2_input_rms_est"], math.sqrt(1.0 + 0.09))
    table = mechanism.table(list(runs.values()))
    assert "| spannorm | collapses | 2 |" in table and "| spannorm | trains | 1 |" in table


def test_the_documents_tables_are_the_grid_tables_and_are_rewritten_in_place(tmp_path):
    """docs/stability/mechanism.md carries the tables mechanism.py makes from the grid's
    recorded table (at the collapse alarm's threshold); --into rewrites them in place."""
    rows = mechanism.load_rows(os.path.join(ROOT, "docs", "stability", "grid",
                                            "results.jsonl.gz"))
    runs = mechanism.analyse(rows)
    doc = os.path.join(ROOT, "docs", "stability", "mechanism.md")
    with open(doc) as f:
        text = f.read()
    start, end = text.index(mechanism.BEGIN), text.index(mechanism.END)
    assert mechanism.report_markdown(runs, mechanism.collapse_threshold(), level=2) in \
        text[start:end]
    copy = tmp_path / "mechanism.md"
    copy.write_text(text)
    few = runs[:3]
    for _ in range(2):
        mechanism.update_document(str(copy), few, 1e-3)
    rewritten = copy.read_text()
    assert rewritten.startswith(text[:start]) and rewritten.count(mechanism.BEGIN) == 1
    assert mechanism.per_run_table(few) in rewritten and len(rewritten) < len(text)
    fresh = tmp_path / "fresh.md"
    fresh.write_text("# A note\n")
    mechanism.update_document(str(fresh), few, 1e-3)
    assert fresh.read_text().startswith("# A note\n\n" + mechanism.BEGIN)
