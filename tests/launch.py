"""Launching processes from tests, and the per-rank result protocol of the rank programs.

Test side:
    ROOT, TESTS           the repository and its tests/ folder
    environment(extra)    what a launched process gets: this environment without a parent
                          torchrun's rank variables, this tree first on PYTHONPATH, one OpenMP
                          thread (two cores run several ranks), plus `extra`
    run(command)          a subprocess with that environment, output captured as text
    torchrun(program)     `python -m torch.distributed.run --standalone` of a script under
                          tests/ or of `-m module`; only from tests marked `torchrun`, which
                          is what requesting conftest's `torchrun` fixture does
    rank_results(where)   every rank's record of a launch, or the failure with the first
                          rank's traceback

Rank side (a program torchrun started):
    rank()                this process's global rank
    reporting(where)      on an exception, write <where>/rank<r>.error (the traceback) and
                          take the rank down at once: torchrun then stops the other ranks
                          instead of leaving them blocked in a collective
    write_result(where, record)   <where>/rank<r>.json
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# Set by conftest.py around each test: launching torchrun from a test that is not marked
# `torchrun` is refused, so that the marker (and `tools/run_tests.sh --fast`) can be trusted.
current_test = None

_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def environment(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run(command: Sequence, *, timeout: float = 600, env: Optional[Dict[str, str]] = None,
        **kwargs) -> subprocess.CompletedProcess:
    """`command` (str()-ed) in a subprocess; `env` adds to `environment()`."""
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=timeout, env=environment(env), **kwargs)


def python(*args, **kwargs) -> subprocess.CompletedProcess:
    """This interpreter in a subprocess: `python(script_or_-c_or_-m, *args, ...)`."""
    return run([sys.executable, *args], **kwargs)


def require_torchrun_marker() -> None:
    if current_test is not None and current_test.get_closest_marker("torchrun") is None:
        raise RuntimeError(f"{current_test.nodeid} launches torchrun: request the `torchrun` "
                           "fixture (conftest.py), which marks it `torchrun`")


def torchrun_command(program: Sequence, nproc: int = 2) -> List[str]:
    """`program`: a script and its arguments, or ["-m", module, ...]."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *map(str, program)]


def torchrun(*program, nproc: int = 2, timeout: float = 600,
             env: Optional[Dict[str, str]] = None, **kwargs) -> subprocess.CompletedProcess:
    """Run `program` (a script path and its arguments, or "-m", module, ...) on `nproc` ranks."""
    require_torchrun_marker()
    return run(torchrun_command(program, nproc), timeout=timeout, env=env, **kwargs)


def rank_errors(root) -> List[str]:
    """The tracebacks of every rank<r>.error under `root`, at any depth, in path order."""
    paths = sorted(glob.glob(os.path.join(str(root), "**", "rank*.error"), recursive=True))
    return [Path(p).read_text() for p in paths]


def check_launch(result: subprocess.CompletedProcess, root) -> None:
    """Fail with the first rank's traceback (else torchrun's stderr) unless all went well."""
    errors = rank_errors(root)
    assert result.returncode == 0 and not errors, (
        f"launch failed (exit {result.returncode}):\n"
        + (errors[0] if errors else result.stderr[-6000:]))


def rank_results(where, nproc: int) -> List[dict]:
    """Every rank's record written by `write_result(where, ...)`, in rank order."""
    paths = sorted(glob.glob(os.path.join(str(where), "rank*.json")))
    assert len(paths) == nproc, (where, paths)
    return [json.loads(Path(where, f"rank{r}.json").read_text()) for r in range(nproc)]


# ------------------------------------------------------------------------------- rank side
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


@contextmanager
def reporting(where):
    try:
        yield
    except BaseException:
        os.makedirs(where, exist_ok=True)
        error = traceback.format_exc()
        Path(where, f"rank{rank()}.error").write_text(error)
        sys.stderr.write(error)
        sys.stderr.flush()
        os._exit(1)


def write_result(where, record) -> None:
    os.makedirs(where, exist_ok=True)
    Path(where, f"rank{rank()}.json").write_text(json.dumps(record))
