"""What this machine has: a usable GPU, Transformer Engine to run on it.

The one place these are asked, below everything that decides by them: the configuration's checks
(what a flag needs), the runtime (device, backend), the model specs (TE or local layers).
``SPANNORM_FORCE_CPU=1`` forces the CPU path on a machine that has GPUs, e.g. to reproduce a
CPU-only failure on a cluster node; it is a debugging aid (``torch.cuda`` still reports the GPUs
to code that asks it directly), not a supported production mode. Importing this module imports
neither torch nor megatron-core: each question does, when asked.

It also decides one thing by the answer, before megatron-core is imported: without a GPU,
megatron-core's `jit_fuser` compiles nothing (`eager_jit_fuser_without_gpu`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

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


def host_memory_bytes():
    """Physical memory, or the cgroup's limit where that is lower; None where unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max",
                       "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and there is a GPU for it to run on."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    return bool(HAVE_TE) and has_accelerator()


# ------------------------------------------------------------------ megatron-core's jit_fuser
_JIT_MODULE = "megatron.core.jit"


class _EagerJitFuserWithoutGpu(importlib.abc.MetaPathFinder):
    """Finds `megatron.core.jit` as Python would, and throws megatron-core's own switch,
    `disable_jit_fuser()`, the moment that module has run, on a machine without a GPU.

    Why: megatron-core 0.16.1 sets `jit_fuser = torch.compile` when `megatron.core.jit` is
    imported, and about twenty of its functions (fusions/, activations, the MoE router and
    experts) are decorated with it while `megatron.core` itself is being imported. On a machine
    without a GPU that buys nothing and costs twice:
    - decorating alone imports TorchDynamo and Inductor: about 1.4 s of CPU out of 5 in every
      process that imports megatron-core (each rank, each tool, each checkpoint writer);
    - a decorated function that runs is traced by TorchDynamo, which fails under the CPU
      runtime's device-argument mode (patches/cpu_eager_expert_bias.py).
    The fusions they build are GPU kernel fusions, which the model turns off on CPU
    (model/fusions.py). `disable_jit_fuser()` called later would come too late: importing
    `megatron.core.jit` imports `megatron.core`, which decorates. Hence the switch is thrown
    as the module finishes loading, before anything decorates. A GPU process keeps
    `torch.compile`: `has_accelerator()` decides then (torch is imported by that point).
    """

    def find_spec(self, name, path, target=None):
        if name != _JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            if not has_accelerator():
                module.disable_jit_fuser()

        spec.loader.exec_module = exec_module
        return spec


def eager_jit_fuser_without_gpu() -> None:
    """Make megatron-core's `jit_fuser` the identity on a machine without a GPU, if
    megatron-core is not imported yet (`spannorm_megatron/__init__.py` calls it, and every
    command imports the package before megatron-core). Idempotent."""
    if _JIT_MODULE in sys.modules or any(isinstance(finder, _EagerJitFuserWithoutGpu)
                                         for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _EagerJitFuserWithoutGpu())
