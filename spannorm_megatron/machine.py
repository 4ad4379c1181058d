"""What this machine has: a usable GPU, Transformer Engine to run on it.

The one place these are asked, below everything that decides by them: the configuration's checks
(what a flag needs), the runtime (device, backend), the model specs (TE or local layers).
``SPANNORM_FORCE_CPU=1`` forces the CPU path on a machine that has GPUs, e.g. to reproduce a
CPU-only failure on a cluster node; it is a debugging aid (``torch.cuda`` still reports the GPUs
to code that asks it directly), not a supported production mode. Importing this module imports
neither torch nor megatron-core: each question does, when asked.
"""

from __future__ import annotations

import os

FORCE_CPU_ENV = "SPANNORM_FORCE_CPU"


def force_cpu() -> bool:
    return os.environ.get(FORCE_CPU_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def has_accelerator() -> bool:
    """True when a usable CUDA device exists and ``SPANNORM_FORCE_CPU`` does not veto it.

    ``is_available()`` alone can be true with zero visible devices (e.g. an empty
    ``CUDA_VISIBLE_DEVICES``), so the device count is checked too.
    """
    if force_cpu():
        return False
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and there is a GPU for it to run on."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE) and has_accelerator()
