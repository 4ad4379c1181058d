"""Which device this process trains on, decided in one place.

Everything else in the runtime asks these functions instead of calling ``torch.cuda`` directly,
so that the CPU path (gloo, CPU tensors) and the GPU path (NCCL, CUDA tensors) branch on the
same answer: `spannorm_megatron.machine.has_accelerator` (``SPANNORM_FORCE_CPU=1`` vetoes a GPU).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from spannorm_megatron.machine import FORCE_CPU_ENV, force_cpu, has_accelerator

from .strict_devices import strict_devices_requested


def device_type() -> str:
    """``"cuda"`` or ``"cpu"``."""
    return "cuda" if has_accelerator() else "cpu"


def backend() -> str:
    """The torch.distributed backend for this device: NCCL on GPUs, gloo on CPU."""
    return "nccl" if has_accelerator() else "gloo"


def current_device() -> torch.device:
    """The device this rank's tensors live on (``cuda:<current>`` or ``cpu``).

    Every tensor that enters a collective or meets a model output is made on this device. In
    strict device mode (``SPANNORM_STRICT_DEVICES=1``, CPU only) it answers ``cuda:0``, as a GPU
    rank would; the CPU runtime maps that to the CPU and flags tensors made elsewhere.
    """
    if has_accelerator():
        return torch.device("cuda", torch.cuda.current_device())
    if strict_devices_requested():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def ranks_per_node(cap: int = 2) -> int:
    """How many ranks a one-node launch of the examples starts here: one per GPU up to `cap`,
    or `cap` CPU ranks (gloo) on a machine without GPUs. NCCL refuses two ranks on one GPU."""
    if has_accelerator():
        return max(1, min(cap, torch.cuda.device_count()))
    return cap


def pipeline_communication_problem(parallel) -> Optional[str]:
    """Why this machine cannot carry `parallel`'s (a ParallelConfig's) pipeline communication
    flags, or None."""
    backend_flag = parallel.pipeline_model_parallel_comm_backend
    if backend_flag == "nccl" and not (has_accelerator() and torch.distributed.is_nccl_available()):
        return ("--pipeline-model-parallel-comm-backend nccl needs GPUs, and this machine has "
                "none (CPU ranks communicate through gloo): drop the flag")
    if backend_flag == "ucc":
        if not (has_accelerator() and torch.distributed.is_ucc_available()):
            return ("--pipeline-model-parallel-comm-backend ucc needs GPUs and a PyTorch built "
                    "with UCC (torch.distributed.is_ucc_available()), which this machine lacks: "
                    "drop the flag")
        if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1" or \
                parallel.tensor_model_parallel_size > 1:
            return ("--pipeline-model-parallel-comm-backend ucc needs CUDA_DEVICE_MAX_CONNECTIONS "
                    "> 1 (megatron-core), and tensor parallelism (or the launchers) set it to 1: "
                    "drop the flag, or run without tensor parallelism with "
                    "CUDA_DEVICE_MAX_CONNECTIONS unset")
    if parallel.use_ring_exchange_p2p and not hasattr(torch.distributed, "ring_exchange"):
        return ("--use-ring-exchange-p2p needs torch.distributed.ring_exchange, which only "
                "custom PyTorch builds have, not this one: drop it (batch_isend_irecv is used)")
    return None


def check_launch(distributed_backend: Optional[str] = None, parallel=None) -> None:
    """Refuse a launch this node cannot run, before any process group exists: more local ranks
    than GPUs, a backend the device cannot use (``nccl`` needs GPUs, ``gloo`` is our CPU path),
    or pipeline communication it lacks (`parallel`, a ParallelConfig).
    Raises :class:`~spannorm_megatron.errors.ConfigError` naming the fix."""
    from spannorm_megatron.errors import ConfigError

    from .launch import launch_environment

    why = pipeline_communication_problem(parallel) if parallel is not None else None
    if why:
        raise ConfigError(why + ".")
    local_ranks = launch_environment().local_world_size
    if has_accelerator() and local_ranks > torch.cuda.device_count():
        raise ConfigError(
            f"this node runs {local_ranks} ranks (torchrun --nproc_per_node) but has "
            f"{torch.cuda.device_count()} GPU(s); NCCL needs one GPU per rank: launch at most "
            f"{torch.cuda.device_count()} ranks per node.")
    if distributed_backend is None or distributed_backend == backend():
        return
    if distributed_backend == "nccl":
        why = (f"{FORCE_CPU_ENV} is set" if force_cpu() and torch.cuda.is_available()
               else "this machine has no GPU")
        raise ConfigError(f"--distributed-backend nccl needs GPUs, and {why}: drop the flag "
                          f"(gloo is used on CPU) or unset {FORCE_CPU_ENV}.")
    raise ConfigError(f"--distributed-backend {distributed_backend} on GPUs: the GPU path "
                      f"communicates through NCCL; drop the flag, or set {FORCE_CPU_ENV}=1 "
                      f"to run on the CPUs.")
