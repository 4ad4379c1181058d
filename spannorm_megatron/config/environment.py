"""The environment variables this package reads, each declared once with its kind, and checked
as the flags are (`check_environment`, run by every entry point's parser): a value that is not
of its variable's kind ends the command with one message naming the variable and the fix,
instead of a ValueError deep in the run, a division by zero, or a switch silently off.

Unset or empty means unset. The kinds:

    count        a non-negative integer (torchrun's RANK, WORLD_SIZE, ...)
    switch       1/true/yes/on or 0/false/no/off, any case
    bit          0 or 1 (Transformer Engine's NVTE_* switches, read as integers)
    port         an integer 1-65535
    tflops       a positive number of TFLOP/s
    output_file  a file that can be written (`config.paths`)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

from spannorm_megatron.config.paths import path_problem
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.machine import FORCE_CPU_ENV

SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("0", "false", "no", "off")

STRICT_DEVICES_ENV = "SPANNORM_STRICT_DEVICES"
PEAK_TFLOPS_ENV = "SPANNORM_PEAK_TFLOPS"

LAUNCH_FIX = ("torchrun sets it for each rank; unset it to run a single process, or launch "
              "with torchrun.")


@dataclass(frozen=True)
class EnvironmentVariable:
    name: str
    kind: str
    doc: str
    fix: str


def _count(text: str) -> Optional[str]:
    return None if text.isdigit() and text.isascii() else "is not a non-negative integer"


def _switch(text: str) -> Optional[str]:
    return None if text.lower() in SWITCH_ON + SWITCH_OFF else \
        f"is not a switch ({'/'.join(SWITCH_ON)} or {'/'.join(SWITCH_OFF)})"


def _bit(text: str) -> Optional[str]:
    return None if text in ("0", "1") else "is not 0 or 1"


def _port(text: str) -> Optional[str]:
    return None if _count(text) is None and 1 <= int(text) <= 65535 else \
        "is not a port number (1-65535)"


def _tflops(text: str) -> Optional[str]:
    try:
        value = float(text)
    except ValueError:
        return "is not a number of TFLOP/s"
    return None if math.isfinite(value) and value > 0 else "must be a positive, finite number"


def _output_file(text: str) -> Optional[str]:
    return path_problem("output_file", "", text)


KINDS: Dict[str, Callable[[str], Optional[str]]] = {
    "count": _count, "switch": _switch, "bit": _bit, "port": _port, "tflops": _tflops,
    "output_file": _output_file}
"""One check of each kind: why a value is not of it, or None."""

ENVIRONMENT: Dict[str, EnvironmentVariable] = {v.name: v for v in (
    EnvironmentVariable("RANK", "count", "This rank's place in the launch.", LAUNCH_FIX),
    EnvironmentVariable("WORLD_SIZE", "count", "Ranks in the launch.", LAUNCH_FIX),
    EnvironmentVariable("LOCAL_RANK", "count", "This rank's place on its node.", LAUNCH_FIX),
    EnvironmentVariable("LOCAL_WORLD_SIZE", "count", "Ranks on this node.", LAUNCH_FIX),
    EnvironmentVariable("TORCHELASTIC_RESTART_COUNT", "count",
                        "How often torchrun restarted the workers.", LAUNCH_FIX),
    EnvironmentVariable("CUDA_DEVICE_MAX_CONNECTIONS", "count",
                        "CUDA's hardware work queues (1 under tensor parallelism on GPUs).",
                        "give a positive number (torchrun's launchers here set 1), or unset it."),
    EnvironmentVariable("MASTER_PORT", "port", "The rendezvous port.",
                        "torchrun sets it (--master-port); unset it, or give a free port."),
    EnvironmentVariable("TORCHELASTIC_ERROR_FILE", "output_file",
                        "Where a failing rank writes its error for torchrun's summary.",
                        "torchrun sets it; unset it, or point it at a writable file."),
    EnvironmentVariable(FORCE_CPU_ENV, "switch", "Run on the CPU although GPUs are present.",
                        "set it to 1 to force the CPU path, or unset it."),
    EnvironmentVariable(STRICT_DEVICES_ENV, "switch",
                        "Refuse host tensors where a GPU run would (tests).",
                        "set it to 1 to turn strict devices on, or unset it."),
    EnvironmentVariable(PEAK_TFLOPS_ENV, "tflops",
                        "Peak dense TFLOP/s of one device, for the logged MFU.",
                        "give the device's peak in TFLOP/s (e.g. 989 for an H100's bf16), or "
                        "unset it to use the built-in table."),
    *(EnvironmentVariable(name, "bit", "Transformer Engine's attention switch.",
                          "unset it and choose the attention with --attention-backend.")
      for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")),
)}


def variable_problem(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The refusal of `name`'s value in `environ` (default: this process's), or None when it is
    unset or of its kind."""
    environ = os.environ if environ is None else environ
    text = environ.get(name, "").strip()
    variable = ENVIRONMENT[name]
    why = KINDS[variable.kind](text) if text else None
    return None if why is None else \
        f"{name}={environ[name]!r} in the environment {why}: {variable.fix}"


def check_environment(environ: Optional[Mapping[str, str]] = None) -> None:
    """Raise ConfigError for the first declared variable whose value is not of its kind."""
    for name in ENVIRONMENT:
        why = variable_problem(name, environ)
        if why:
            raise ConfigError(why)

