"""lab/mechanism.py: signals read before / at / after the collapse, from grid rows."""

import math

from spannorm_megatron.lab import mechanism


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
