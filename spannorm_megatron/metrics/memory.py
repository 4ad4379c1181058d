"""Memory use of this process for the `mem-*` TensorBoard tags (`--log-memory-to-tensorboard`).

Why: running out of memory is the most common way a large run dies; Megatron-LM logs the
allocator's numbers (`mem-reserved-bytes`, `mem-allocated-bytes`, `mem-max-allocated-bytes`,
`mem-allocated-count`), and so do we, with the same names.

On a GPU these are the CUDA caching allocator's counters of the current device, the entries
of `torch.cuda.memory_stats()` Megatron-LM reads (`reserved_bytes.all.current`,
`allocated_bytes.all.current`, `allocated_bytes.all.peak`, `allocation.all.current`): tensors
only, not the CUDA context or NCCL buffers. On CPU there is no allocator counter, so the process's
resident set stands in: `mem-allocated-bytes` is the current RSS (/proc/self/statm; the peak
where that file does not exist) and `mem-max-allocated-bytes` the peak RSS from
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux, bytes on macOS). RSS includes the
interpreter, libraries and everything else the process maps, so on CPU these are an upper
bound on tensor memory, comparable between steps of one run but not with GPU numbers.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Dict

import torch

from spannorm_megatron.runtime import has_accelerator


def memory_stats() -> Dict[str, int]:
    """{'mem-allocated-bytes', 'mem-max-allocated-bytes'[, 'mem-reserved-bytes',
    'mem-allocated-count' on GPU]}."""
    if has_accelerator():
        stats = torch.cuda.memory_stats()
        return {
            "mem-reserved-bytes": int(stats.get("reserved_bytes.all.current", 0)),
            "mem-allocated-bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "mem-max-allocated-bytes": int(stats.get("allocated_bytes.all.peak", 0)),
            "mem-allocated-count": int(stats.get("allocation.all.current", 0)),
        }
    current = current_rss_bytes()
    peak = peak_rss_bytes()
    if current is None:
        current = peak
    # The kernel updates the peak lazily; never report a peak below the current value.
    return {"mem-allocated-bytes": current, "mem-max-allocated-bytes": max(peak, current)}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (getrusage)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)


def current_rss_bytes():
    """Current resident set size from /proc/self/statm, or None where it does not exist."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def reset_resident_high_water_mark() -> bool:
    """Reset this process's peak resident set size (Linux: `5` into /proc/self/clear_refs) so
    that `resident_high_water_bytes` measures from now on; False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def resident_high_water_bytes():
    """Peak resident set size since the process started or since the last
    `reset_resident_high_water_mark` (VmHWM of /proc/self/status), or None without it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
