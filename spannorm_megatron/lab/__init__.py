"""The stability lab: how signals and training behave with depth, for every norm placement.

Modules (docs/stability.md shows what they measured on this project's machines):

- `batch`         the fixed batch the probe runs on: embedded-corpus text or random tokens
- `propagation`   per-layer forward/backward signals of single-process models at initialization
                  and after N optimizer steps (`run_propagation`, `probe`)
- `results`       summary rows, CSV/JSON/Markdown files, reloading a run's JSON
- `plots`         PNG figures (matplotlib, Agg backend)
- `cli`           `tools/signal_propagation.py` (its options declared as dataclass fields)
- `training_log`  `spannorm-train` logs / TensorBoard events -> history and verdict (final
                  losses, divergence, loss spikes)
- `sweep`         the depth sweep's report (`examples/depth_sweep/report.py`)
- `grid`          the depth sweep's grid mode (`examples/depth_sweep/grid.py`): a package of
                  spec, plan, data, runner, signals, results and cli; `grid_plots` its figures
- `mechanism`     the signals around a collapse, from the grid's rows
- `rules`         training's rules as the lab applies them: the collapse threshold and the
                  loss-spike rule, read from the flags' declarations, never restated
- `compressed`    the compressed tables the lab writes into docs/ (byte-identical re-exports)

Importing this package imports neither megatron-core nor matplotlib; the modules that need them
import them when used.
"""
