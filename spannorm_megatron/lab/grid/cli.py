"""`python examples/depth_sweep/grid.py`: run, resume, summarize or export a grid. Its options
are declared once, as `GridCommand`'s fields."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.errors import UserError
from spannorm_megatron.lab.grid.results import (
    export_results,
    read_results,
    summarize,
    summarize_by_setting,
)
from spannorm_megatron.lab.grid.runner import run_grid
from spannorm_megatron.lab.grid.spec import ROOT
from spannorm_megatron.config.options import (
    add_arguments,
    check,
    from_namespace,
    option,
    parse_options,
)

DESCRIPTION = """\
The depth sweep's grid mode: a declared list of factor cells, each varied alone from the
sweep's base setting, trained one run at a time with `spannorm-train`, unattended and resumable,
into one results table."""


@dataclass
class GridCommand:
    """What one invocation does: run (or resume) a grid, or summarize / export its table."""

    grid: str = option(os.path.join(ROOT, "examples", "depth_sweep", "grid.yaml"),
                       "grid file (default: examples/depth_sweep/grid.yaml)", path="input_file")
    out: List[str] = option(
        doc="output directory (default: runs/grid); rerun with the same --out to resume. With "
            "--summary / --export, several directories (workers that ran different --groups) "
            "are merged",
        default_factory=lambda: [os.path.join(ROOT, "runs", "grid")], nargs="+",
        path="output_folder")
    dry_run: bool = option(False, "check the grid and print the plan with estimates; train "
                                  "nothing")
    retry_failed: bool = option(False, "train again runs whose process failed (finished runs "
                                       "are kept)")
    max_runs: Optional[int] = option(None, "stop after N runs")
    groups: Optional[List[str]] = option(
        None, "run only these groups of the grid file (e.g. a second worker with its own --out; "
              "--export merges the tables)", nargs="+")
    keep_checkpoints: bool = option(False, "keep the checkpoints saved for the projection RMS")
    summary: bool = option(False, "print the summary table of --out's results and exit")
    export: Optional[str] = option(
        None, "write --out's results (results.jsonl.gz, summary.md and the figures of "
              "lab/grid_plots.py) into this directory, overwriting the files there, and exit",
        path="output_folder")

    def __post_init__(self) -> None:
        check(self)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, GridCommand)
    return parser


def parse_args(argv: Optional[List[str]] = None) -> GridCommand:
    return from_namespace(GridCommand, parse_options(build_parser(), [GridCommand], argv))


def main(argv: Optional[List[str]] = None) -> int:
    command = parse_args(argv)
    if command.summary:
        rows = [r for out in command.out
                for r in read_results(os.path.join(out, "results.jsonl"))]
        print(summarize_by_setting(rows) + "\n" + summarize(rows), end="")
        return 0
    if command.export:
        export_results(command.out, command.export)
        return 0
    if len(command.out) > 1:
        print("error: a grid runs into one --out; several are for --summary / --export.",
              file=sys.stderr)
        return 2
    try:
        run_grid(command.grid, command.out[0], dry_run=command.dry_run,
                 retry_failed=command.retry_failed, max_runs=command.max_runs,
                 keep_checkpoints=command.keep_checkpoints, groups=command.groups,
                 log=lambda m: print(m, flush=True))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
