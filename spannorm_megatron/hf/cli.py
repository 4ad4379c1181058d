"""What the Hugging Face command-line tools share: error reporting and quiet imports.

Bad input (`spannorm_megatron.errors.UserError`: `ConversionError`, data, config and checkpoint
errors) is printed as `error: <message>` on stderr
without a traceback, exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional

from spannorm_megatron.cli import run_cli as shared_run_cli


def run_cli(main: Callable[[Optional[List[str]]], Optional[int]], argv=None) -> int:
    quiet()
    return shared_run_cli(main, argv, interrupted="interrupted; nothing was published")


def quiet() -> None:
    """Hide import-time notes about optional kernels and transformers' progress bars."""
    for pattern in (".*Transformer Engine and Apex are not installed", ".*Apex is not installed",
                    ".*apex.*", ".*TE.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
