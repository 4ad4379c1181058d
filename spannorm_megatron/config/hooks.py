"""Megatron-LM's flags for what the loop does around its steps besides training: the profiler
window, manual garbage collection and emptying the CUDA cache (`training.hooks` carries them
out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.config.options import check, option
from spannorm_megatron.errors import ConfigError


@dataclass
class RunHooksConfig:
    """Profiling, garbage collection and memory release around the steps (Megatron-LM's flags
    and defaults)."""

    empty_unused_memory_level: int = option(
        0, "Release the CUDA caching allocator's unused memory (less fragmentation, slower): 1 "
        "after each step's forward-backward and each evaluation batch, 2 also after the "
        "optimizer step; 0: never. No-op on CPU.", choices=(0, 1, 2))
    manual_gc: bool = option(
        False, "Turn Python's automatic garbage collector off and collect at fixed points "
        "instead: at the start, every --manual-gc-interval steps and around evaluations, the "
        "same steps on every rank.")
    manual_gc_interval: int = option(
        0, "With --manual-gc: steps between collections (0: only at the start and around "
        "evaluations).", at_least=0)
    manual_gc_eval: bool = option(
        True, "With --manual-gc: collect everything before each evaluation and the youngest "
        "generation after it; --no-manual-gc-eval skips both.", flag="--no-manual-gc-eval",
        negative=True, aliases=("--disable-manual-gc-eval",))
    profile: bool = option(
        False, "Profile the steps --profile-step-start to --profile-step-end on --profile-ranks "
        "(with --use-pytorch-profiler; otherwise CUDA's profiler API for nsys, GPU only).")
    profile_step_start: int = option(10, "First profiled step.", at_least=0)
    profile_step_end: int = option(12, "Step after which profiling stops.", at_least=0)
    profile_ranks: List[int] = option(
        doc="Global ranks that profile.", default_factory=lambda: [0], nargs="+")
    use_pytorch_profiler: bool = option(
        False, "Profile with torch.profiler (a trace per profiled rank in --tensorboard-dir, "
        "viewable in TensorBoard or Perfetto; works on CPU).")

    def __post_init__(self) -> None:
        check(self)
        if any(rank < 0 for rank in self.profile_ranks):
            raise ConfigError(f"--profile-ranks {self.profile_ranks}: ranks are >= 0.")
        if self.profile and self.profile_step_end <= self.profile_step_start:
            raise ConfigError(
                f"--profile-step-end {self.profile_step_end} must be after --profile-step-start "
                f"{self.profile_step_start}: the profiled window would be empty.")

    def notices(self) -> List[str]:
        """What the run says once about flags that change nothing in it."""
        lines = []
        if not self.manual_gc and (self.manual_gc_interval or not self.manual_gc_eval):
            lines.append("--manual-gc-interval and --no-manual-gc-eval act only with "
                         "--manual-gc: Python's automatic garbage collector stays on.")
        if self.use_pytorch_profiler and not self.profile:
            lines.append("--use-pytorch-profiler without --profile: nothing is profiled.")
        from spannorm_megatron.machine import has_accelerator

        if self.empty_unused_memory_level and not has_accelerator():
            lines.append(f"--empty-unused-memory-level {self.empty_unused_memory_level}: no "
                         f"CUDA caching allocator on CPU, nothing to release (a no-op here).")
        return lines

    def check_run(self, world_size: int, tensorboard_dir: Optional[str]) -> None:
        """What needs the rest of the run: the world size, a trace directory, a GPU."""
        from spannorm_megatron.machine import has_accelerator

        if not self.profile:
            return
        outside = [rank for rank in self.profile_ranks if rank >= world_size]
        if outside:
            raise ConfigError(f"--profile-ranks {outside}: this run has ranks 0 to "
                              f"{world_size - 1} only.")
        if self.use_pytorch_profiler and not tensorboard_dir:
            raise ConfigError("--profile --use-pytorch-profiler writes its trace into "
                              "--tensorboard-dir (as Megatron-LM does): give one.")
        if not self.use_pytorch_profiler and not has_accelerator():
            raise ConfigError(
                "--profile without --use-pytorch-profiler drives CUDA's profiler API (for nsys), "
                "and this machine has no GPU: add --use-pytorch-profiler (torch.profiler runs "
                "on CPU), or drop --profile.")
