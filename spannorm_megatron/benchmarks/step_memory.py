"""What one training step adds to the memory in use before it: the allocator's peak on a GPU,
the resident set's high-water mark on CPU (`spannorm-benchmark --log-step-memory`)."""

from __future__ import annotations

from spannorm_megatron.benchmarks.harness import synchronize


def start_step_memory() -> int:
    """Memory in use now, the peak counter reset to it: the allocator's on a GPU, the
    resident set on CPU."""
    import gc

    import torch

    from spannorm_megatron.metrics.memory import (
        current_rss_bytes,
        reset_resident_high_water_mark,
    )

    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    gc.collect()
    _return_freed_host_memory()
    if not reset_resident_high_water_mark():
        raise RuntimeError("--log-step-memory on CPU needs /proc/self/clear_refs (Linux)")
    return current_rss_bytes()


def _return_freed_host_memory() -> None:
    """Make the resident set follow the tensors alive on CPU: glibc keeps freed blocks for
    reuse (and raises its mmap threshold after each large free), so a step's tensors could
    come from memory already resident and add nothing to the peak. A fixed 64 KiB mmap
    threshold gives every larger allocation its own mapping, returned when freed; then the
    heap is trimmed. Only the benchmark process is affected."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (fixing it turns the dynamic one off)
    libc.malloc_trim(0)


def step_memory_added(start: int) -> int:
    import torch

    from spannorm_megatron.metrics.memory import resident_high_water_bytes

    synchronize()
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()) - start
    return resident_high_water_bytes() - start


def measure_step_memory(bench, rounds: int) -> dict:
    """{'plain': [...], 'log': [...]}: bytes each step of `bench` (a `harness.Bench`) adds to the
    memory in use before it, plain and logging steps of the run's monitor alternating, `rounds`
    of each."""
    from spannorm_megatron.training.monitor import RunMonitor

    monitor = RunMonitor(bench.model, bench.model_config, seq_length=bench.seq_length,
                         global_batch_size=bench.micro_batch,
                         num_microbatches=bench.num_microbatches, log_interval=2,
                         tensorboard_dir=None, dtype=bench.model[0].config.params_dtype)
    samples = {"plain": [], "log": []}
    try:
        for iteration in range(1, 2 * rounds + 1):
            start = start_step_memory()
            monitor.begin_step(iteration)
            seconds, result = bench.step(monitor=monitor)
            monitor.end_step(iteration, result, consumed_samples=0,
                             learning_rate=result.learning_rate, loss_scale=1.0,
                             seconds_per_step=seconds if iteration % 2 == 0 else None)
            samples["log" if monitor.is_log_step(iteration) else "plain"].append(
                step_memory_added(start))
    finally:
        monitor.close()
    return samples
