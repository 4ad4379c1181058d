"""CPU runtime: the router's expert-bias bookkeeping runs eagerly, not through torch.compile.

Needed only where megatron-core was imported before this package: otherwise its jit_fuser
already compiles nothing on CPU (spannorm_megatron/machine.py).

megatron-core 0.16.1 decorates ``TopKRouter._apply_expert_bias`` (the per-expert token count
that aux-loss-free balancing, ``--moe-router-enable-expert-bias``, updates the bias from) with
``jit_fuser``, which is ``torch.compile`` on torch >= 2.2. Under the CPU runtime TorchDynamo
cannot trace it: the device-argument mode (``cpu_device_arguments``) sits on the torch-function
mode stack, and Dynamo fails building a guard on it (``'function' object has no attribute
'__func__'``). The function is one in-place ``+=`` of counts; compiling it is a GPU kernel-fusion
matter, so on CPU the undecorated function is the same computation without the compiler.
"""

from __future__ import annotations

from spannorm_megatron.runtime.device import has_accelerator

from .contract import Patch


def _router_class():
    from megatron.core.transformer.moe.router import TopKRouter

    return TopKRouter


def _uncompiled(function):
    # torch.compile keeps the function it wraps here.
    return getattr(function, "_torchdynamo_orig_callable", None)


def _probe(original) -> bool:
    compiled = original(_router_class(), "_apply_expert_bias")
    return not has_accelerator() and _uncompiled(compiled) is not None


def _swaps():
    router = _router_class()
    return [(router, "_apply_expert_bias", _uncompiled(vars(router)["_apply_expert_bias"]))]


PATCH = Patch(
    "cpu_eager_expert_bias",
    target="megatron-core 0.16.1 transformer.moe.router.TopKRouter._apply_expert_bias",
    why=__doc__,
    obsolete_when=("TopKRouter._apply_expert_bias is no longer wrapped by torch.compile (or "
                   "TorchDynamo traces under a torch-function mode)."),
    probe=_probe,
    swaps=_swaps,
)
