"""Strict device mode (``SPANNORM_STRICT_DEVICES=1``, CPU runtime only): legacy constructors.

``torch.Tensor(...)``, ``torch.FloatTensor([...])``, ``torch.LongTensor(n)`` and the other CPU
tensor types of ``torch`` build their tensor in C without passing through torch-function modes
(torch 2.13), so strict device mode never sees them and would count what they make as a device
tensor; on a GPU they allocate in host memory, where NCCL refuses it. This replaces the CPU
tensor-type names of ``torch`` by :class:`~spannorm_megatron.runtime.strict_devices.HostConstructor`
stand-ins (``isinstance`` and ``t.type(...)`` keep working), and gives ``torch.Tensor`` a
``__new__`` that records ``torch.Tensor(...)`` the same way (subclasses with their own
``__new__``, such as ``Parameter``, are untouched). A check, not a way to train.
"""

from __future__ import annotations

import torch

from spannorm_megatron.runtime.device import has_accelerator
from spannorm_megatron.runtime.strict_devices import (
    HostConstructor,
    record_legacy,
    strict_devices_requested,
)

from .contract import Patch


def legacy_types():
    """(name, type) of the CPU legacy tensor types `torch` exports."""
    return sorted((t.__name__, t) for t in torch._tensor_classes if t.__module__ == "torch")


def _swaps():
    # TorchDynamo registers a stand-in for `torch.Tensor.__new__` when it is first imported,
    # checking that the function it replaces has its signature (or takes anything): imported
    # now, it registers against the real one. The replacement below takes anything too.
    import torch._dynamo  # noqa: F401

    construct = torch._C.TensorBase.__new__

    def new(*args, **kwargs):  # (cls, data..., requires_grad=...)
        return record_legacy(construct(*args, **kwargs), args[1:])

    return [(torch, name, HostConstructor(legacy)) for name, legacy in legacy_types()] + [
        (torch.Tensor, "__new__", staticmethod(new))]


PATCH = Patch(
    "strict_legacy_constructors",
    target=("torch's CPU legacy tensor types (torch.FloatTensor, torch.LongTensor, ...) and "
            "torch.Tensor.__new__ (torch 2.13: not seen by torch-function modes)"),
    why=__doc__,
    obsolete_when=("never: a test aid, applied only when SPANNORM_STRICT_DEVICES is set (drop "
                   "it if torch routes legacy constructors through torch-function modes)."),
    probe=lambda original: strict_devices_requested() and not has_accelerator(),
    swaps=_swaps,
)
