"""RNG state of every rank: python, numpy, torch, the device generator and megatron's tracker,
laid out as Megatron-LM lays it out, so that Megatron-LM's `load_checkpoint` finds its part.

Resuming bit-for-bit needs the exact generator states of each rank: dropout masks come from
megatron's RNG tracker streams (the tensor-parallel stream differs per TP rank, the expert stream
per expert rank), everything else from the default generators. One ``ShardedObject('rng_state')``
holds a list of state dicts, sharded as Megatron-LM's ``get_rng_state`` shards it for the
torch_dist format (``rng_sharding`` in the run record says which; records without it are
``pp,tp``):

- ``pp,tp`` (expert parallel size 1): global shape (PP, TP), one object per (pp, tp) position,
  written by data-parallel rank 0 (``replica_id`` = DP rank). The object holds the states of
  the position's DP ranks, gathered in DP order. Megatron-LM writes only its own state there (its
  DP ranks are seeded alike) and reads entry 0, which here is DP rank 0's: the same thing.
- ``pp,tp,dp`` (expert parallel size > 1): global shape (PP, TP, DP), every rank writes its own
  one-entry list at (pp, tp, dp), ``replica_id`` 0. Expert-parallel ranks are carved out of the
  data-parallel ones, so the DP ranks of a (pp, tp) position hold different expert streams; and
  a Megatron-LM run under EP asks for exactly this key.

Loading under the same (PP, TP, DP) sizes gives every rank its own state back. When only the
data-parallel size changed, a ``pp,tp`` checkpoint gives every rank DP rank 0's state (Megatron-LM
without ``--data-parallel-random-init``); a ``pp,tp,dp`` one has no state for the new DP ranks, and
the run keeps its own seeds, as it does when the tensor or pipeline size changed (no meaningful
mapping; Megatron-LM ignores the states then too).

The device generators. On CPU the runtime maps megatron's "CUDA" RNG calls to the CPU generator
(patch `cpu_rng` of the CPU runtime), so the tracker states are CPU generator states (5056 bytes)
where a GPU run has CUDA ones (16 bytes: seed and Philox offset). Megatron-LM, which runs on GPUs
only, loads the entry with ``torch.cuda.set_rng_state(state['cuda_rng_state'])`` and
``tracker.set_states(state['rng_tracker_states'])``; the tracker installs a state in the CUDA
generator at its first ``fork`` (the first attention dropout, whatever its probability). A
``None`` there fails at once, and a CPU state passes ``set_states`` and fails at that first fork
("RNG state is wrong size"). So a CPU save writes, under those two keys, valid CUDA states: the
ones Megatron-LM's own seeding gives this rank (``model_parallel_cuda_manual_seed`` of the run's
seed + 100 x pipeline rank, see `_fresh_cuda_states`), i.e. the fresh CUDA streams Megatron-LM
falls back to whenever it cannot use a checkpoint's, while the host generators (python, numpy,
torch), which are the same on both devices, load exactly. The CPU tracker states, which no GPU
can take, go under our own key ``cpu_rng_tracker_states`` (Megatron-LM never reads it), and our
CPU resume reads them from there. Leaving the entry out instead would need
``args.no_save_rng = True`` (else Megatron-LM fails on the missing key), a false statement of the
run's flags, and would lose the host states that do transfer. Each entry records the device type
it comes from (``device_type``); our own loader keeps its fresh seeds on the other kind of device.
"""

from __future__ import annotations

import logging
import random
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from spannorm_megatron.runtime import device_type

logger = logging.getLogger(__name__)

KEY = "rng_state"
PP_TP = "pp,tp"
PP_TP_DP = "pp,tp,dp"
CPU_TRACKER_KEY = "cpu_rng_tracker_states"


def sharding(expert_model_parallel_size: int) -> str:
    """How Megatron-LM shards the RNG state under this expert-parallel size."""
    return PP_TP_DP if expert_model_parallel_size > 1 else PP_TP


def cuda_generator_state(seed: int, offset: int = 0) -> torch.Tensor:
    """torch's CUDA generator state after ``torch.cuda.manual_seed(seed)`` (and `offset` Philox
    steps): the seed and the offset as two 64-bit integers, 16 bytes, as
    ``torch.cuda.get_rng_state`` returns it and ``set_rng_state`` takes it."""
    return torch.tensor([seed, offset], dtype=torch.int64).view(torch.uint8)


def _fresh_cuda_states() -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(CUDA default generator, tracker streams) as Megatron-LM's seeding leaves them on this rank
    before any draw: megatron-core 0.16.1's ``model_parallel_cuda_manual_seed(seed)`` with
    Megatron-LM's per-stage seed, which is what `runtime.set_seed` calls here too."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mcore_random

    from spannorm_megatron.runtime.distributed import base_seed

    seed = base_seed() + 100 * ps.get_pipeline_model_parallel_rank()
    streams = {
        mcore_random.get_data_parallel_rng_tracker_name(): seed,
        mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME:
            seed + 2718 + ps.get_tensor_model_parallel_rank(),
        mcore_random.get_expert_parallel_rng_tracker_name():
            seed + 1024 + 100 * ps.get_expert_model_parallel_rank()
            + ps.get_expert_tensor_parallel_rank(),
    }
    return cuda_generator_state(seed), {name: cuda_generator_state(s)
                                        for name, s in streams.items()}


def _local_state() -> dict:
    from megatron.core import tensor_parallel

    tracker = {name: state.clone() if isinstance(state, torch.Tensor) else state
               for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    states = {
        "device_type": device_type(),
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }
    if states["device_type"] == "cuda":
        states["cuda_rng_state"] = torch.cuda.get_rng_state()
        states["rng_tracker_states"] = tracker
    else:  # see the module docstring
        states["cuda_rng_state"], states["rng_tracker_states"] = _fresh_cuda_states()
        states[CPU_TRACKER_KEY] = tracker
    return states


def local_state() -> dict:
    """This rank's generator states, as a checkpoint saves them for it (`restore([state],
    PP_TP_DP)` sets them back): for a copy kept in memory (checkpoint.snapshot)."""
    return _local_state()


def _object(states, how: str, dp_rank: int, dp_size: int):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp = (ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank())
    tp = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank())
    if how == PP_TP_DP:
        return ShardedObject(KEY, states, (pp[0], tp[0], dp_size), (pp[1], tp[1], dp_rank),
                             replica_id=0)
    return ShardedObject(KEY, states, (pp[0], tp[0]), (pp[1], tp[1]), replica_id=dp_rank)


def _dp() -> Tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    return (ps.get_data_parallel_rank(with_context_parallel=True),
            ps.get_data_parallel_world_size(with_context_parallel=True),
            ps.get_data_parallel_group(with_context_parallel=True))


def save_request(how: str):
    """This rank's part of the ``rng_state`` ShardedObject for a save sharded `how` (collective
    over data parallel for ``pp,tp``)."""
    dp_rank, dp_size, dp_group = _dp()
    local = _local_state()
    if how == PP_TP_DP or dp_size == 1:
        return _object([local], how, dp_rank, dp_size)
    states = [None] * dp_size
    torch.distributed.all_gather_object(states, local, group=dp_group)
    return _object(states, how, dp_rank, dp_size)


def load_request(how: str):
    """The ``rng_state`` object this rank reads from a checkpoint sharded `how` (call only when
    `restorable` said yes: a ``pp,tp,dp`` checkpoint then has this rank's DP coordinates)."""
    dp_rank, dp_size, _ = _dp()
    return _object(None, how, dp_rank, dp_size)


def restorable(record: dict, layout: dict) -> Tuple[bool, Optional[str]]:
    """Whether the RNG states saved with `record` map onto this `layout`, and if not, why (for
    the log)."""
    saved_layout = record.get("layout", {})
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    saved = tuple(saved_layout.get(k) for k in keys)
    now = tuple(layout.get(k) for k in keys)
    if saved != now:
        return False, (f"(TP, PP) changed from {saved} to {now}: the saved RNG states are ignored "
                       f"and this run keeps its own seeds")
    saved_dp = saved_layout.get("data_parallel_size")
    if record.get("rng_sharding", PP_TP) == PP_TP_DP and saved_dp != layout["data_parallel_size"]:
        return False, (f"the RNG states were saved per rank under expert parallelism and the "
                       f"data-parallel size changed from {saved_dp} to "
                       f"{layout['data_parallel_size']}: they are ignored and this run keeps its "
                       f"own seeds")
    return True, None


def restore(states: list, how: str = PP_TP) -> bool:
    """Set this rank's generators from the list loaded for it (see `load_request`). Returns False
    (generators untouched) when the states come from another kind of device."""
    from megatron.core import tensor_parallel

    dp_rank, dp_size, _ = _dp()
    # Checkpoints from before the field was recorded were all made on CPU.
    saved_device = states[0].get("device_type", "cpu")
    if saved_device != device_type():
        if torch.distributed.get_rank() == 0:
            logger.warning("checkpoint: RNG states were saved on %s and this run is on %s; they "
                           "are ignored and this run keeps its own seeds", saved_device,
                           device_type())
        return False
    if how == PP_TP_DP or len(states) == dp_size:
        state = states[0] if how == PP_TP_DP else states[dp_rank]
    else:
        if torch.distributed.get_rank() == 0:
            logger.warning("checkpoint: data-parallel size changed from %d to %d; every rank "
                           "takes data-parallel rank 0's RNG state", len(states), dp_size)
        state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if saved_device == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng_state"])
        tracker = state["rng_tracker_states"]
    else:  # the CPU "CUDA" generator is torch's, restored above
        # Before CPU_TRACKER_KEY existed, CPU saves kept their tracker states under the
        # Megatron-LM key.
        tracker = state.get(CPU_TRACKER_KEY, state["rng_tracker_states"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(tracker))
    return True
