"""Process groups and seeds for megatron-core, on GPUs (NCCL) or CPU (gloo).

:func:`initialize` sets up a rank launched by ``torchrun`` (or a plain single process). It
validates the parallel layout *before* any process-group work -- a wrong layout otherwise
surfaces as a RuntimeError deep inside ``initialize_model_parallel`` on every rank, or as a
hang -- then picks the device, creates the process groups and seeds the RNGs the way
Megatron-LM does. It expects this machine's patch sets applied: entry points call
``spannorm_megatron.process.initialize``, which applies them and then calls this one.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import torch

from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ConfigError, ParallelLayoutError
from spannorm_megatron.orphans import die_with_launcher, die_with_parent

from .device import backend as device_backend
from .device import has_accelerator, pipeline_communication_problem
from .launch import launch_environment
from .strict_devices import strict_devices_requested

__all__ = [
    "ParallelLayout",
    "ParallelLayoutError",
    "base_seed",
    "destroy",
    "gather_updated_parameters",
    "initialize",
    "megatron_device_kwargs",
    "set_seed",
    "validate_layout",
]


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of every parallel dimension, with the derived data-parallel sizes."""

    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: Optional[int]
    context_parallel_size: int
    expert_model_parallel_size: int
    expert_tensor_parallel_size: int
    data_parallel_size: int
    expert_data_parallel_size: int


def validate_layout(world_size: int, parallel: Optional[ParallelConfig] = None,
                    context_parallel_size: Optional[int] = None) -> ParallelLayout:
    """Check that `parallel`'s sizes tile ``world_size`` as megatron-core requires.

    Dense ranks are laid out as tp x cp x dp x pp; expert ranks as etp x ep x edp x pp
    (etp defaults to tp). `context_parallel_size` overrides `parallel`'s. Raises
    :class:`ParallelLayoutError` naming the sizes and a fix.
    """
    parallel = parallel or ParallelConfig()
    if context_parallel_size is None:
        context_parallel_size = parallel.context_parallel_size
    tp, pp, cp, ep = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                      context_parallel_size, parallel.expert_model_parallel_size)
    etp = parallel.resolved_expert_tensor_parallel_size
    sizes = {
        "world_size": world_size,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "context_parallel_size": cp,
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": etp,
    }
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParallelLayoutError(f"{name} must be a positive integer, got {value!r}.")

    model = tp * pp * cp
    if world_size % model:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}) = {model}. "
            f"Launch a multiple of {model} ranks (torchrun --nproc_per_node) or reduce "
            f"these sizes."
        )
    vpp = parallel.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if not isinstance(vpp, int) or isinstance(vpp, bool) or vpp < 1:
            raise ParallelLayoutError(
                f"virtual_pipeline_model_parallel_size must be None or a positive integer, "
                f"got {vpp!r}."
            )
        if pp < 2:
            raise ParallelLayoutError(
                f"virtual_pipeline_model_parallel_size ({vpp}) needs the interleaved schedule, "
                f"which needs pipeline_model_parallel_size > 1 (got {pp}). Set "
                f"pipeline_model_parallel_size >= 2 or virtual_pipeline_model_parallel_size=None."
            )
    why = pipeline_communication_problem(parallel)
    if why:
        raise ParallelLayoutError(why + ".")
    expert = etp * ep * pp
    if world_size % expert:
        # world_size % pp == 0 here (pp divides the model size checked above).
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by expert_tensor_parallel_size ({etp}) x "
            f"expert_model_parallel_size ({ep}) x pipeline_model_parallel_size ({pp}) = "
            f"{expert}. Choose expert_model_parallel_size x expert_tensor_parallel_size "
            f"dividing world size / pipeline_model_parallel_size = {world_size // pp}, or "
            f"launch a multiple of {expert} ranks."
        )
    return ParallelLayout(
        world_size=world_size,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        data_parallel_size=world_size // model,
        expert_data_parallel_size=world_size // expert,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) without them."""
    env = launch_environment()
    return env.rank, env.world_size, env.local_rank


def _rendezvous(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """`init_process_group`'s rendezvous arguments.

    After `torchrun --max-restarts` restarted the workers, the agent's store still holds the
    previous attempt's keys; megatron-core's groups get the same names again, so the new ranks
    would read the dead ranks' gloo/NCCL addresses and fail to connect. The same holds for a
    process that tears its groups down and initializes again (one rank program running several
    jobs in turn). Each attempt, and each initialization within it, therefore works under its
    own prefix of that store: every rank initializes as often as the others, so they agree."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if world_size > 1 and missing:
        # Refused here, where the ranks would meet: the checks before it run (and are tested)
        # under a WORLD_SIZE set by hand, without a launcher.
        raise ConfigError(f"WORLD_SIZE={world_size} in the environment, but "
                          f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"unset: the ranks have no address to meet at. Unset WORLD_SIZE to run "
                          f"a single process, or launch with torchrun.")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or world_size == 1:
        return {"init_method": _init_method(world_size)}
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", rank, world_size, timeout=timeout))
    prefix = f"spannorm/attempt_{restart}/init_{next(_INITIALIZATIONS)}/"
    return {"store": torch.distributed.PrefixStore(prefix, store)}


_INITIALIZATIONS = itertools.count()


def _init_method(world_size: int) -> str:
    if world_size != 1 or ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        return "env://"  # what torchrun set (`_rendezvous` refused a world without it)
    # A lone process (tests, notebooks) needs a rendezvous address nobody else uses.
    return f"tcp://127.0.0.1:{_free_port()}"


_SEED = {"base": 1234}


def base_seed() -> int:
    """The seed of the last `set_seed` (before the per-stage offset)."""
    return _SEED["base"]


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron's RNG tracker the way Megatron-LM does.

    The base seed is offset per pipeline stage (stages hold different layers); megatron's
    tracker then keeps the default stream equal across tensor-parallel ranks and derives
    distinct tensor-parallel and expert-parallel streams. Needs model parallelism initialised.
    """
    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    _SEED["base"] = seed
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(
    parallel: Optional[ParallelConfig] = None,
    *,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelLayout:
    """Set up torch.distributed and megatron-core model parallelism for this rank, laid out as
    `parallel` says (default: no model parallelism).

    Reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun); without them runs as a world of one. In
    order: validate the layout, pick the device (``cuda:LOCAL_RANK``; without a GPU, check
    that the CPU runtime is applied: entry points apply the patch sets through
    ``spannorm_megatron.process``), create the default process group (NCCL or gloo) unless it exists, (re)create megatron-core's
    model-parallel groups, and seed (:func:`set_seed`). Calling it again with other sizes
    keeps the default group and replaces the model-parallel ones. `timeout_minutes` is every
    process group's timeout (`spannorm-train --distributed-timeout-minutes`, 10 as in
    Megatron-LM; tools that call this directly wait 30).
    Returns the validated :class:`ParallelLayout`.
    """
    rank, world_size, local_rank = _launch_env()
    parallel = parallel or ParallelConfig()
    # Validate first: nothing is patched, imported or connected for a layout that cannot work.
    layout = validate_layout(world_size, parallel)
    from megatron.core import parallel_state

    if layout.tensor_model_parallel_size > 1:
        # One hardware queue, so that tensor-parallel communication is scheduled before the
        # GEMM it overlaps (Megatron-LM's launchers set it; read at CUDA context creation,
        # which has not happened yet). An explicit setting is kept.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    die_with_launcher()  # a killed torchrun agent takes its ranks along
    die_with_parent()  # forked checkpoint writers and data workers must not outlive the rank
    if has_accelerator():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        _check_cpu_runtime()

    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=device_backend(), rank=rank, world_size=world_size, timeout=timeout,
            **_rendezvous(rank, world_size, timeout))
    elif torch.distributed.get_world_size() != world_size:
        raise RuntimeError(
            f"torch.distributed is already initialized with world size "
            f"{torch.distributed.get_world_size()}, but the environment says {world_size}."
        )

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
        pipeline_model_parallel_comm_backend=parallel.pipeline_model_parallel_comm_backend,
        order=parallel.rank_order,
    )
    set_seed(seed)
    return layout


def _check_cpu_runtime() -> None:
    """megatron-core calls torch.cuda unconditionally: without a GPU it needs the CPU runtime's
    patches, which the entry point applies (the runtime does not import patches/)."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError):
        raise RuntimeError(
            "no GPU and the CPU runtime is not applied: megatron-core cannot run. Initialize "
            "through spannorm_megatron.process.initialize(), or call "
            "spannorm_megatron.process.apply_patches() before runtime.initialize()."
        ) from None


def destroy() -> None:
    """Tear down megatron-core's groups and the default process group (safe to repeat)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_updated_parameters(model: list) -> None:
    """Give every rank the full updated parameters now.

    With ``--overlap-param-gather`` the distributed optimizer defers the all-gather of updated
    parameters into the next forward pass (DDP's forward pre-hooks, evaluation's too). Whatever
    reads the weights outside a forward (a checkpoint, weight statistics) calls this first;
    without the overlap the gather already happened in the optimizer step, and this does nothing.
    """
    for chunk in model:
        ddp_config = getattr(chunk, "ddp_config", None)  # plain modules (tools, tests) too
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def megatron_device_kwargs() -> dict:
    """Config fields a megatron-core model config should set on this device.

    On CPU, parallel linear layers and embeddings must be initialised on the host
    (``use_cpu_initialization``); on GPU nothing is overridden.
    """
    if has_accelerator() or strict_devices_requested():
        # Strict device mode builds the model as a GPU run does, so that it checks that path.
        return {}
    return {"use_cpu_initialization": True}
