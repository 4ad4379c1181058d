"""Readying this process for megatron-core: the patch sets first, then the process groups.

The one place that joins the top-level ``patches/`` folder and the runtime. The patches depend
on ``runtime.device`` (they ask whether a GPU is present); the runtime never imports them. Every
entry point (the Trainer, the tools, the lab, test workers) calls :func:`initialize` here, or
:func:`apply_patches` before ``runtime.initialize``, so which alterations a process carries is
decided in one visible call:

- ``UPSTREAM``: fixes for megatron-core defects, on any device;
- ``CPU_RUNTIME`` (only without a GPU): what lets the CPU play the CUDA device megatron-core
  assumes; on a GPU nothing of it is applied, so the GPU path runs megatron-core unaltered;
- ``STRICT_DEVICES`` (with the CPU runtime, when ``SPANNORM_STRICT_DEVICES`` is set).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from typing import List, Optional

from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.runtime import ParallelLayout, has_accelerator, launch_environment
from spannorm_megatron.runtime import initialize as initialize_groups

__all__ = ["apply_patches", "enable_cpu_runtime", "initialize", "is_cpu_runtime_enabled",
           "load_patches", "should_enable_cpu_runtime"]

_LOCK = threading.Lock()


def load_patches():
    """Return the ``spannorm_megatron.patches`` package: the top-level ``patches/`` folder.

    setup.py installs that folder under this name (package_dir). A source checkout (used through
    PYTHONPATH, or an editable install of another checkout, whose finder maps the name to *that*
    checkout's folder) loads its own folder under the name instead.
    """
    name = __package__ + ".patches"
    if name in sys.modules:
        return sys.modules[name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.join(root, "patches")
    if not (os.path.isfile(os.path.join(root, "setup.py"))
            and os.path.isfile(os.path.join(folder, "__init__.py"))):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def should_enable_cpu_runtime(accelerator_present: Optional[bool] = None) -> bool:
    """The decision alone: the CPU runtime is for processes without a CUDA device."""
    if accelerator_present is None:
        accelerator_present = has_accelerator()
    return not accelerator_present


def is_cpu_runtime_enabled() -> bool:
    """True while patches of the CPU runtime are applied (process-wide ones from any thread)."""
    return any(p.is_applied() for p in load_patches().CPU_RUNTIME)


def enable_cpu_runtime() -> bool:
    """Let megatron-core run with the CPU as its device; no-op when a GPU is present.

    Idempotent. Process-wide patches are applied once; the device-argument mode is pushed in
    the calling thread (call again from any other thread that runs megatron code).
    Returns True when the CPU runtime is active.
    """
    if not should_enable_cpu_runtime():
        return False
    patches = load_patches()
    with _LOCK:
        patches.apply_all(patches.CPU_RUNTIME + patches.STRICT_DEVICES)
    return True


def apply_patches() -> List[str]:
    """Apply this machine's patch sets (idempotent): the CPU runtime when there is no GPU, then
    the upstream fixes. Returns the names of the upstream fixes in effect."""
    enable_cpu_runtime()
    return load_patches().apply_all()


def initialize(parallel: Optional[ParallelConfig] = None, *, seed: int = 1234,
               timeout_minutes: int = 30) -> ParallelLayout:
    """This machine's patches, then `runtime.initialize` (layout check, device, process groups,
    seeds; see there). The layout is checked before anything is patched."""
    from spannorm_megatron.runtime import validate_layout

    validate_layout(launch_environment().world_size, parallel)
    apply_patches()
    return initialize_groups(parallel, seed=seed, timeout_minutes=timeout_minutes)
