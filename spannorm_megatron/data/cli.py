"""What the data command-line tools share: error reporting.

Bad input is reported as its one-paragraph message on stderr, without a traceback, and exit
status 2 (the status argparse uses for bad arguments); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from spannorm_megatron.cli import run_cli as shared_run_cli


def run_cli(main: Callable[[Optional[List[str]]], Optional[int]], argv=None) -> int:
    """Run `main(argv)`; a DataError (any UserError) becomes `error: <message>` and status 2."""
    return shared_run_cli(main, argv, interrupted="interrupted; no output files were changed")
