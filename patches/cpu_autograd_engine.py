"""CPU runtime: keep the device-argument mode active inside the autograd engine.

The mode of ``cpu_device_arguments`` is thread-local and torch pops a mode while its handler
runs, so a ``loss.backward()`` dispatched through it would run custom ``Function.backward`` and
DDP grad hooks (which allocate with CUDA device arguments) without it. The wrapper pushes the
mode for the engine run.
"""

from __future__ import annotations

import torch.autograd as autograd

from spannorm_megatron.runtime.device import has_accelerator

from .contract import Patch
from .cpu_device_arguments import MODE, mode_active


def _swaps():
    run_backward = autograd._engine_run_backward

    def _engine_run_backward(*args, **kwargs):
        if mode_active():
            return run_backward(*args, **kwargs)
        with MODE:
            return run_backward(*args, **kwargs)

    return [(autograd, "_engine_run_backward", _engine_run_backward)]


PATCH = Patch(
    "cpu_autograd_engine",
    target="torch >= 2.4: torch.autograd._engine_run_backward (backward, autograd.backward/grad)",
    why=__doc__,
    obsolete_when="cpu_device_arguments is obsolete, or torch keeps modes active in backward.",
    probe=lambda original: not has_accelerator() and callable(
        original(autograd, "_engine_run_backward")),
    swaps=_swaps,
)
