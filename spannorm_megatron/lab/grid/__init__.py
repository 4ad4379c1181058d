"""The depth sweep's grid mode: a declared list of factor cells, each varied alone from the
sweep's base setting, trained one run at a time with `spannorm-train`, unattended and resumable,
into one results table.

A grid file (YAML; `examples/depth_sweep/grid.yaml` is the stability study's):

    base_config: config.yaml        # the sweep's spannorm-train flags (relative to this file)
    budget_hours: 40                # the whole grid must be estimated to fit, or nothing runs
    max_run_minutes: 5              # and so must every single run
    threads: 1                      # OMP/torch threads per run
    corpora:                        # corpus name -> `embedded` or a text file (never copied)
      stdlib: embedded
      shakespeare: ../shared/data/tinyshakespeare.txt    # relative to the repository root
    estimate: {startup_s: 30, step_s_per_layer: 0.0055}  # the time model, see estimate_seconds
    rms_every: 20                   # output-projection RMS every N iterations (0: not recorded)
    heldout: {text: ../shared/data/wikitext2-valid.txt, max_bytes: 16384}
                                    # tools/evaluate.py on the final checkpoint (optional)
    groups:                         # run in this order
      - name: decisive
        placements: [spannorm, prenorm, postnorm]
        depths: [128]
        seeds: [1234, 1235, 1236]
        cells: [{}, {tokenizer: bytes}, {scale_mode: forward}]   # {} = the base setting

A cell maps factor names (`FACTORS`) to levels; everything it does not name stays at the base
setting (the base config, the `stdlib` corpus, SentencePiece 4096 trained on the run's corpus,
`--scale-mode init`, each placement's default `--scale-init`, untied embeddings). Within a group
the order is seed, then cell, then placement, so a grid stopped early has every cell at its
first seed.

Output under OUT (default runs/grid):

    OUT/data/                    prepared corpora, tokenizers and indexed datasets (reused)
    OUT/runs/<name>/             train.log, tensorboard/, run.txt (as examples/depth_sweep/run.sh),
                                 heldout.json / heldout.log (with `heldout`)
    OUT/results.jsonl            one JSON object per finished run, appended when it finishes
    OUT/results.csv              the same rows (without histories) in grid order, rewritten
    OUT/grid.txt                 the grid file and the command, for the record

`--export DIR` (the docs' copy) writes DIR/results.jsonl.gz (every row with its histories: the
one table, compressed, the same bytes for the same rows), summary.md and the figures,
overwriting an earlier export.

A run counts as finished when its row is in results.jsonl; an interrupted grid started again
skips those and trains the rest (a run that was cut off is started over). `--retry-failed`
also trains runs whose process failed.

Bad input -- an unknown factor or level, a grid estimated to take longer than `budget_hours`,
a run estimated over `max_run_minutes`, a missing corpus file -- raises GridError before any
data is prepared or any run trains.

The rooms: `factors` (the factors, their levels and one planned run), `spec` (the grid file,
checked), `plan` (each run's flags and the time estimate), `data` (corpora, tokenizers,
indexed datasets), `signals` (what a finished run left: TensorBoard signals, projection RMS),
`runner` (one run, the whole grid), `results` (the table, its summaries and the export) and
`cli` (`examples/depth_sweep/grid.py`).
"""

from spannorm_megatron.lab.grid.cli import GridCommand, main
from spannorm_megatron.lab.grid.factors import FACTORS, GridError, PlannedRun, Setting, cell_label
from spannorm_megatron.lab.grid.plan import check_budget, estimate_seconds, train_flags
from spannorm_megatron.lab.grid.results import (
    EXPORTED_RESULTS,
    ROW_COLUMNS,
    export_results,
    latest_rows,
    read_results,
    summarize,
    summarize_by_setting,
    with_derived,
    write_csv,
)
from spannorm_megatron.lab.grid.runner import run_grid, run_one
from spannorm_megatron.lab.grid.spec import Grid, load_grid, resolve

__all__ = ["EXPORTED_RESULTS", "FACTORS", "Grid", "GridCommand", "GridError", "PlannedRun",
           "ROW_COLUMNS", "Setting", "cell_label", "check_budget", "estimate_seconds",
           "export_results", "latest_rows", "load_grid", "main", "read_results", "resolve",
           "run_grid", "run_one", "summarize", "summarize_by_setting", "train_flags",
           "with_derived", "write_csv"]
