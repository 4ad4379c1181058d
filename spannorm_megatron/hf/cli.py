"""What the Hugging Face command-line tools share: error reporting and quiet imports.

Bad input (`spannorm_megatron.errors.UserError`: `ConversionError`, data, config and checkpoint
errors) is printed as `error: <message>` on stderr
without a traceback, exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

from spannorm_megatron.cli import run_cli as shared_run_cli


def run_cli(main: Callable[[Optional[List[str]]], Optional[int]], argv=None) -> int:
    quiet()
    return shared_run_cli(main, argv, interrupted="interrupted; nothing was published")


DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""`--dtype` of the tools (the torch dtypes: `hf.export.DTYPES`, read only when a tool runs)."""

EXPORT_FORMATS = ("auto", "native", "spannorm")
"""`spannorm-convert-to-hf --format`: a native class when it can hold the model, or ours."""

DEVICES = ("auto", "cpu", "cuda")
"""`--device` of the tools that run a model: auto takes the GPU when there is one."""


def hide_gpu_for_cpu_runs(argv) -> None:
    """--device cpu on a GPU machine: megatron's runtime uses a GPU whenever it sees one, so hide
    it before torch initializes CUDA."""
    for i, arg in enumerate(argv):
        if (arg == "--device" and argv[i + 1:i + 2] == ["cpu"]) or arg == "--device=cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""


def quiet() -> None:
    """Hide transformers' progress bars and notes (the package's import quiets megatron-core's
    import-time notes on optional kernels)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
