"""CPU runtime: the "CUDA" random generator is the CPU default generator.

``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker`` call
``torch.cuda.manual_seed/get_rng_state/set_rng_state`` and megatron's ``_set_cuda_rng_state``.
Without CUDA those are silently *queued* (``torch.cuda._lazy_call``) or raise, so the tracker
would never switch states. Redirected to the CPU default generator, which is the one CPU
dropout and init draw from, TP ranks share the default stream and differ in the model-parallel
stream exactly as on GPU.
"""

from __future__ import annotations

import logging

import torch

from spannorm_megatron.runtime.device import has_accelerator

from .contract import Patch


def get_rng_state(device="cuda"):
    return torch.get_rng_state()


def set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def manual_seed(seed):
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all and would recurse if
    # someone redirected that too; the default generator is all there is on CPU.
    torch.default_generator.manual_seed(int(seed))


def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _SameGeneratorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _mcore_random():
    from megatron.core.tensor_parallel import random

    return random


def _probe(original) -> bool:
    """megatron's setter defers to torch.cuda._lazy_call, which queues forever without CUDA."""
    setter = original(_mcore_random(), "_set_cuda_rng_state")
    return not has_accelerator() and "_lazy_call" in setter.__code__.co_names


def _swaps():
    mcore_random = _mcore_random()
    logger = logging.getLogger(mcore_random.__name__)
    swaps = [(ns, name, fn) for ns in (torch.cuda, torch.cuda.random)
             for name, fn in (("get_rng_state", get_rng_state), ("set_rng_state", set_rng_state),
                              ("manual_seed", manual_seed))]
    # The tracker warns that the "CPU RNG state changed within GPU RNG context": with the CPU as
    # device the two generators are the same one by design.
    return swaps + [(mcore_random, "_set_cuda_rng_state", _set_cuda_rng_state),
                    (logger, "filters", [*logger.filters, _SameGeneratorFilter()])]


PATCH = Patch(
    "cpu_rng",
    target=("torch.cuda(.random).get_rng_state/set_rng_state/manual_seed; megatron-core 0.16.1 "
            "tensor_parallel.random._set_cuda_rng_state and its logger's filters"),
    why=__doc__,
    obsolete_when=("megatron's RNG tracker takes a device-agnostic generator, i.e. "
                   "_set_cuda_rng_state no longer goes through torch.cuda._lazy_call."),
    probe=_probe,
    swaps=_swaps,
)
