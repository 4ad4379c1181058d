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
from typing import Optional

import torch

from spannorm_megatron.config.hooks import RunHooksConfig


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
