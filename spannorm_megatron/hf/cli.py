"""What the Hugging Face command-line tools share: error reporting and quiet imports.

Bad input (`spannorm_megatron.errors.UserError`, which `ConversionError`, data and config errors
are, and the checkpoint package's `CheckpointError`) is printed as `error: <message>` on stderr
without a traceback, exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, List, Optional


def _bad_input_types() -> tuple:
    from spannorm_megatron.errors import UserError

    types = [UserError]
    try:
        from spannorm_megatron.checkpoint import CheckpointError

        types.append(CheckpointError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def run_cli(main: Callable[[Optional[List[str]]], Optional[int]], argv=None) -> int:
    quiet()
    bad_input = _bad_input_types()
    try:
        return int(main(argv) or 0)
    except bad_input as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was published", file=sys.stderr, flush=True)
        return 130


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
