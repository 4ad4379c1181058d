"""How every command-line entry point ends: user errors as one line, no traceback."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional

from spannorm_megatron.errors import UserError


def run_cli(main: Callable[[Optional[List[str]]], Optional[int]], argv=None, *,
            interrupted: str = "interrupted") -> int:
    """Run `main(argv)`. A UserError (bad flag, config, data, checkpoint, HF folder) prints
    `error: <message>` and returns 2: the message names the problem and the fix, a traceback
    would only bury it. Anything else is a bug and keeps its traceback."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as exit:  # argparse's refusal (status 2, message printed) or --help
        return exit.code if isinstance(exit.code, int) else 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr, flush=True)
        return 130
