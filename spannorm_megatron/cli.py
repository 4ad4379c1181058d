"""How every command-line entry point ends: user errors as one line, no traceback.

Exit status: 0 done; 1 the run failed though its input was fine (`RunFailure`: non-finite
training, a save the storage refused); 2 bad input (flag, config, data, checkpoint, HF folder); 130 interrupted.
Under torchrun each rank exits so, torchrun itself exits 1 when any rank failed, and its
failure summary names our message as the root cause: it is written to the error file that
torch.distributed.elastic gives each rank (what its `@record` does for exceptions).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, List, Optional

from spannorm_megatron.errors import STORAGE_ERRNOS, RunFailure, UserError


def report_failure(message: str) -> None:
    """Print `message` once (by rank 0 of a torchrun job; every rank would repeat it) and hand
    it to torchrun's failure summary."""
    if not _another_rank_reports():
        print(message, file=sys.stderr, flush=True)
    _write_elastic_error_file(message)


def _another_rank_reports() -> bool:
    """Whether this process is a rank other than 0 of a torchrun job, whose rank 0 prints the
    same message. Anything else prints it: a lone process, and one whose launch variables are
    themselves what is refused (RANK=x, a rank outside WORLD_SIZE, left in a shell), which no
    rank 0 would otherwise report."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    rank, world = (os.environ.get(name, "").strip() for name in ("RANK", "WORLD_SIZE"))
    return rank.isdigit() and world.isdigit() and 0 < int(rank) < int(world)


def _write_elastic_error_file(message: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # The layout of torch's own ErrorHandler.record_exception, with our message where the
    # launcher's summary would show a traceback.
    record = {"message": {"message": message, "extraInfo": {
        "py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as stream:
            json.dump(record, stream)
    except OSError:
        pass  # the summary then says less; the message was printed


def _record_crash() -> None:
    """A bug keeps its traceback, and torchrun's summary shows it instead of a pointer to
    the docs."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(sys.exc_info()[1])


def _out_of_memory(error: BaseException) -> bool:
    """An allocation the machine refused: Python's MemoryError, torch's OutOfMemoryError (CUDA),
    or its CPU allocator's RuntimeError (which megatron-core re-raises naming the module it
    was building)."""
    text = str(error)
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in text or "CUDA out of memory" in text


def run_cli(main: Callable[[Optional[List[str]]], Optional[int]], argv=None, *,
            interrupted: str = "interrupted") -> int:
    """Run `main(argv)`. A UserError (bad flag, config, data, checkpoint, HF folder) prints
    `error: <message>` and returns 2: the message names the problem and the fix, a traceback
    would only bury it. A RunFailure (the input was fine, the run was not) prints the same way
    and returns 1, as does a write the storage refused (`STORAGE_ERRNOS`: no space, a quota or
    file size limit, a read-only or protected place), in whichever command, and an allocation
    the machine refused (out of memory). Anything else is a bug and keeps its traceback."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        report_failure(f"error: {err}")
        return 2
    except RunFailure as err:
        report_failure(f"error: {err}")
        return 1
    except SystemExit as exit:  # argparse's refusal (status 2, message printed) or --help
        return exit.code if isinstance(exit.code, int) else 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr, flush=True)
        return 130
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            if os.environ.get("TORCHELASTIC_ERROR_FILE"):
                _record_crash()
            raise
        where = f" {err.filename}" if err.filename else ""
        report_failure(f"error: the storage refused a write{where}: {err.strerror}. Free space, "
                       f"lift the limit or the protection, or write elsewhere, and run again.")
        return 1
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            if os.environ.get("TORCHELASTIC_ERROR_FILE"):
                _record_crash()
            raise
        what = (str(err).splitlines() or [type(err).__name__])[0][:300]  # MemoryError has none
        report_failure(f"error: out of memory ({what}). The model, "
                       f"batch or sequence does not fit this machine: make them smaller, or "
                       f"split them over more ranks (tensor/pipeline parallelism).")
        return 1
    except Exception:
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            _record_crash()
        raise
