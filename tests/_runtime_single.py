"""Single-process checks for tests/test_runtime.py, run in a fresh interpreter.

The CPU runtime alters process-wide state (torch.cuda entry points, megatron module globals),
and pytest's own process may already have it (tests/conftest.py starts a one-rank world), so it
is exercised here in a fresh interpreter: first what must hold before anything is enabled, then
the CPU runtime. (Each patch alone: tests/_patches_single.py.) Prints one JSON object on the
last line of stdout.
"""

from __future__ import annotations

import json
import threading

import torch


def check_pristine() -> dict:
    """Before anything is enabled: importing patches nothing, an accelerator makes
    enable_cpu_runtime a no-op, and a bad layout fails before any process-group work."""
    import os

    from torch.overrides import _get_current_function_mode_stack

    from spannorm_megatron import process, runtime
    from spannorm_megatron.config.parallel import ParallelConfig

    def untouched() -> bool:
        return (
            torch.cuda.current_device.__module__ == "torch.cuda"
            and torch.cuda.Stream.__module__.startswith("torch.cuda")
            and torch.cuda.get_rng_state.__module__.startswith("torch.cuda")
            and torch.autograd._engine_run_backward.__module__ == "torch.autograd.graph"
            and _get_current_function_mode_stack() == []
            and not process.is_cpu_runtime_enabled()
        )

    patches = process.load_patches()
    out = {"after_import": untouched()}

    real = process.has_accelerator
    process.has_accelerator = lambda: True  # what a GPU machine reports
    try:
        out["enable_with_accelerator"] = process.enable_cpu_runtime()
    finally:
        process.has_accelerator = real
    out["after_enable_with_accelerator"] = untouched()

    os.environ.update(WORLD_SIZE="2", RANK="0")
    try:
        process.initialize(ParallelConfig(tensor_model_parallel_size=3))
        out["bad_layout_error"] = None
    except runtime.ParallelLayoutError as err:
        out["bad_layout_error"] = str(err)
    finally:
        del os.environ["WORLD_SIZE"], os.environ["RANK"]
    out["after_bad_layout"] = untouched() and not torch.distributed.is_initialized()
    out["patches_untouched"] = not any(p.is_applied() for p in patches.ALL)
    out["enabled_after_bad_layout"] = process.is_cpu_runtime_enabled()
    # The runtime applies no patches itself: without a GPU and without the entry point's
    # patch sets it refuses, naming the call that applies them, before any group exists.
    try:
        runtime.initialize(seed=3)
        out["unpatched_error"] = None
    except RuntimeError as err:
        out["unpatched_error"] = str(err)
    out["after_unpatched"] = untouched() and not torch.distributed.is_initialized()
    out["jit_fuser"] = _jit_fuser_checks()
    return out


def _jit_fuser_checks() -> dict:
    """This package was imported before megatron-core: on this CPU machine megatron-core's
    jit_fuser compiles nothing and Inductor was never imported. The same module loaded as a
    GPU machine would load it keeps torch.compile."""
    import importlib.util
    import sys

    import megatron.core
    from megatron.core import jit

    from spannorm_megatron import machine

    out = {"cpu": jit.jit_fuser is jit.noop_decorator,
           "inductor_imported": "torch._inductor.compile_fx" in sys.modules}
    real = machine.has_accelerator
    machine.has_accelerator = lambda: True  # what a GPU machine reports
    try:
        spec = machine._EagerJitFuserWithoutGpu().find_spec("megatron.core.jit",
                                                            megatron.core.__path__)
        fresh = importlib.util.module_from_spec(spec)  # not in sys.modules: nothing else sees it
        spec.loader.exec_module(fresh)
        out["gpu_keeps_torch_compile"] = fresh.jit_fuser is torch.compile
    finally:
        machine.has_accelerator = real
    return out


class _CudaInBackward(torch.autograd.Function):
    """Backward allocates with device="cuda", like megatron's all-to-all and gather backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 + torch.zeros(grad.shape, device="cuda")


def _backward_ok(run) -> bool:
    x = torch.ones(3, requires_grad=True)
    y = _CudaInBackward.apply(x).sum()
    try:
        grad = run(x, y)
    except Exception:  # noqa: BLE001 - the failure itself is the observation
        return False
    return bool(torch.equal(grad if grad is not None else x.grad, torch.full((3,), 2.0)))


def _check_tracker() -> dict:
    """megatron's RNG tracker must really switch generators on CPU, without warning."""
    import logging

    from megatron.core import tensor_parallel

    from spannorm_megatron import runtime

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(tensor_parallel.random.__name__)
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        runtime.set_seed(11)
        plain = torch.rand(3)
        runtime.set_seed(11)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.rand(3)
        after = torch.rand(3)
    finally:
        logger.removeHandler(handler)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(11 + 2718))
    return {
        "fork_uses_model_parallel_seed": bool(torch.equal(forked, expected)),
        "default_resumes_after_fork": bool(torch.equal(after, plain)),
        "warnings": records,
    }


def check_cpu_runtime() -> dict:
    from torch.overrides import _get_current_function_mode_stack

    from spannorm_megatron import process, runtime

    out = {"enabled_before": process.is_cpu_runtime_enabled()}
    out["enable"] = process.enable_cpu_runtime()
    out["enable_again"] = process.enable_cpu_runtime()
    out["modes_on_stack"] = len(_get_current_function_mode_stack())
    out["cuda_is_available"] = torch.cuda.is_available()
    out["factory_device"] = str(torch.zeros(2, device="cuda").device)
    out["int_device"] = str(torch.empty(2, device=torch.cuda.current_device()).device)
    out["to_cuda"] = str(torch.ones(2).to("cuda:0").device)
    out["dot_cuda"] = str(torch.ones(2).cuda().device)
    out["type_name"] = torch.ones(2).type()
    out["type_cast"] = torch.ones(2).type("torch.cuda.HalfTensor").dtype == torch.float16
    out["meta_untouched"] = str(torch.empty(2, device="meta").device)
    out["backward_tensor"] = _backward_ok(lambda x, y: y.backward())
    out["backward_autograd"] = _backward_ok(lambda x, y: torch.autograd.backward(y))
    out["backward_grad"] = _backward_ok(lambda x, y: torch.autograd.grad(y, x)[0])

    def other_thread(result):
        try:
            torch.zeros(1, device="cuda")
            result["without_enable"] = True
        except Exception:  # noqa: BLE001
            result["without_enable"] = False
        process.enable_cpu_runtime()
        result["with_enable"] = str(torch.zeros(1, device="cuda").device)

    thread_result: dict = {}
    thread = threading.Thread(target=other_thread, args=(thread_result,))
    thread.start()
    thread.join()
    out["thread"] = thread_result

    # RNG: the "CUDA" generator is the CPU default generator.
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    b = torch.rand(3)
    out["rng_matches_cpu_seed"] = bool(
        torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(5)))
    )
    out["rng_state_roundtrip"] = bool(torch.equal(a, b))

    # Streams/events as the MoE dispatcher uses them.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        event = stream.record_event()
    event.synchronize()
    torch.cuda.synchronize()
    out["streams"] = True

    # A world of one without torchrun variables, then a second initialize in the same process.
    layout = process.initialize(seed=3)
    out["single_world"] = layout.world_size
    out["backend"] = torch.distributed.get_backend()
    layout = process.initialize(seed=3)
    out["tracker"] = _check_tracker()
    runtime.destroy()
    runtime.destroy()
    out["destroyed"] = not torch.distributed.is_initialized()
    return out


def main() -> None:
    result = {"pristine": check_pristine()}
    result["cpu"] = check_cpu_runtime()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
