"""What the training loop does around its steps besides training: Megatron-LM's profiler
window, manual garbage collection and emptying the CUDA cache.

- `--profile` profiles the steps from `--profile-step-start` to `--profile-step-end` on
  `--profile-ranks`: with `--use-pytorch-profiler`, torch.profiler writes a trace into
  `--tensorboard-dir` (Chrome/TensorBoard format, CPU or GPU); without it, CUDA's profiler API is
  started and stopped around the window for an `nsys profile --capture-range=cudaProfilerApi`
  launch, which needs a GPU (refused on CPU).
- `--manual-gc` turns Python's automatic collector off for the run and collects at the start,
  every `--manual-gc-interval` steps and around evaluations (unless `--no-manual-gc-eval`), so
  that ranks do not pause at different moments.
- `--empty-unused-memory-level` empties the CUDA caching allocator inside the step
  (`training.loop`); on CPU there is none, so it is a no-op there (said once).

The step numbers follow Megatron-LM's `train`: the torch profiler's schedule counts the steps of
this launch (wait start-1, warm up 1, record end-start), the nsys window the global iteration.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from spannorm_megatron.errors import ConfigError
from spannorm_megatron.options import check, option
from spannorm_megatron.runtime import has_accelerator


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
        if self.empty_unused_memory_level and not has_accelerator():
            lines.append(f"--empty-unused-memory-level {self.empty_unused_memory_level}: no "
                         f"CUDA caching allocator on CPU, nothing to release (a no-op here).")
        return lines

    def check_run(self, world_size: int, tensorboard_dir: Optional[str]) -> None:
        """What needs the rest of the run: the world size, a trace directory, a GPU."""
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


class RunHooks:
    """Carries out a `RunHooksConfig` on this rank. The Trainer calls `start` before its first
    step, `before_step`/`after_step` around each (with the iterations done so far), the
    evaluation pair around periodic evaluations, and `close` at the end (also on errors)."""

    def __init__(self, config: RunHooksConfig, tensorboard_dir: Optional[str]):
        self.config = config
        self.tensorboard_dir = tensorboard_dir
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.profiling = config.profile and rank in config.profile_ranks
        self.profiler = None
        self._nvtx = None
        self._gc_was_enabled: Optional[bool] = None

    def start(self) -> None:
        config = self.config
        if config.manual_gc:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()
        if self.profiling and config.use_pytorch_profiler:
            os.makedirs(self.tensorboard_dir, exist_ok=True)
            start, end = config.profile_step_start, config.profile_step_end
            self.profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=max(start - 1, 0),
                                                 warmup=1 if start > 0 else 0,
                                                 active=end - start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.tensorboard_dir),
                record_shapes=True, with_stack=True)
            self.profiler.start()

    def before_step(self, iteration: int) -> None:
        """Before the step that follows `iteration` finished steps."""
        if not self.profiling:
            return
        if self.profiler is not None:
            self.profiler.step()
        elif iteration == self.config.profile_step_start:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self._nvtx.__enter__()

    def after_step(self, iteration: int) -> None:
        """After the step that made `iteration` finished steps."""
        if self.profiling and iteration == self.config.profile_step_end:
            self._stop_profiling()
        if self.config.manual_gc and self.config.manual_gc_interval and \
                iteration % self.config.manual_gc_interval == 0:
            gc.collect()

    def before_evaluation(self) -> None:
        if self.config.manual_gc and self.config.manual_gc_eval:
            gc.collect()

    def after_evaluation(self) -> None:
        if self.config.manual_gc and self.config.manual_gc_eval:
            gc.collect(generation=0)  # what the evaluation itself made

    def _stop_profiling(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        elif self._nvtx is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            self._nvtx.__exit__(None, None, None)
            self._nvtx = None
        self.profiling = False

    def close(self) -> None:
        """Stop a profiler still running (a run shorter than its window keeps what it
        recorded) and give the process its garbage collector back."""
        if self.profiling:
            self._stop_profiling()
        if self._gc_was_enabled:
            gc.enable()
        self._gc_was_enabled = None
