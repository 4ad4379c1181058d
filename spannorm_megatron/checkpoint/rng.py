"""RNG state of every rank: python, numpy, torch, the device generator and megatron's tracker.

Resuming bit-for-bit needs the exact generator states of each rank: dropout masks come from
megatron's RNG tracker streams (the tensor-parallel stream differs per TP rank, the expert stream
per expert rank), everything else from the default generators. As Megatron-LM does, the states
of the ranks sharing a (pipeline, tensor) position are gathered over the data-parallel group and
saved as one ``ShardedObject('rng_state')`` per (pp, tp) position, written by data-parallel rank
0. Loading under the same (pp, tp, dp) sizes gives every rank its own state back. When only the
data-parallel size changed, every rank takes data-parallel rank 0's state (Megatron-LM without
``--data-parallel-random-init``). When the tensor or pipeline size changed, there is no
meaningful mapping and the saved states are ignored (the run keeps its fresh seeds), as in
Megatron-LM.

On CPU the runtime maps megatron's "CUDA" RNG calls to the CPU generator
(patch `cpu_rng` of the CPU runtime), so the tracker states are CPU generator states (5056 bytes)
where a GPU run saves CUDA ones (16 bytes). The states record the device type they come from; a
resume on the other kind of device keeps its fresh seeds, as after a layout change.
"""

from __future__ import annotations

import logging
import random
from typing import Optional, Tuple

import numpy as np
import torch

from spannorm_megatron.runtime import device_type

logger = logging.getLogger(__name__)

KEY = "rng_state"


def _local_state() -> dict:
    from megatron.core import tensor_parallel

    states = {
        "device_type": device_type(),
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": {
            name: state.clone() if isinstance(state, torch.Tensor) else state
            for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
    }
    return states


def sharded_state(for_loading: bool = False):
    """This rank's part of the ``rng_state`` ShardedObject (collective over data parallel).

    For loading only the object's placement matters; the data is not gathered then.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    states = None
    if not for_loading:
        local = _local_state()
        if dp_size > 1:
            states = [None] * dp_size
            torch.distributed.all_gather_object(states, local, group=dp_group)
        else:
            states = [local]
    return ShardedObject(
        KEY,
        states,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def restorable(saved_layout: dict, layout: dict) -> Tuple[bool, Optional[str]]:
    """Whether the saved states map onto this layout, and if not, why (for the log)."""
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    saved = tuple(saved_layout.get(k) for k in keys)
    now = tuple(layout.get(k) for k in keys)
    if saved != now:
        return False, (f"(TP, PP) changed from {saved} to {now}: the saved RNG states are ignored "
                       f"and this run keeps its own seeds")
    return True, None


def restore(states: list) -> bool:
    """Set this rank's generators from the gathered list of a (pp, tp) position. Returns False
    (generators untouched) when the states come from another kind of device."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    # Checkpoints from before the field was recorded were all made on CPU.
    saved_device = states[0].get("device_type", "cpu")
    if saved_device != device_type():
        if torch.distributed.get_rank() == 0:
            logger.warning("checkpoint: RNG states were saved on %s and this run is on %s; they "
                           "are ignored and this run keeps its own seeds", saved_device,
                           device_type())
        return False
    if len(states) == dp_size:
        state = states[dp_rank]
    else:
        if torch.distributed.get_rank() == 0:
            logger.warning("checkpoint: data-parallel size changed from %d to %d; every rank "
                           "takes data-parallel rank 0's RNG state", len(states), dp_size)
        state = states[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
    return True
