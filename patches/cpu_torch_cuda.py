"""CPU runtime: the ``torch.cuda`` entry points megatron-core calls unconditionally.

Without a GPU they raise. ``torch.cuda.current_device()`` is called almost everywhere; it
answers 0, a valid CUDA ordinal that ``cpu_device_arguments`` maps to the CPU wherever it is
used, so code such as ``torch.device("cuda", torch.cuda.current_device())`` keeps working.
Streams and events (the MoE all-to-all dispatcher's device-to-host stream, p2p and DDP
``torch.cuda.synchronize``): CPU work is synchronous, so they become the device-agnostic
``torch.cpu`` ones, with an event returned from ``Stream.record_event`` (torch.cpu's returns
None, which the dispatcher then calls ``.synchronize()`` on). ``torch.cuda.is_available()``
keeps answering False: megatron code that asks takes its own CPU branch.
"""

from __future__ import annotations

import torch

from spannorm_megatron.runtime.device import has_accelerator

from .contract import Patch


class _HostStream(torch.cpu.Stream):
    """A CUDA-stream stand-in: CPU ops are synchronous, so ordering is already guaranteed."""

    def __init__(self, *args, **kwargs):  # accepts device=/priority= like torch.cuda.Stream
        super().__init__()

    def record_event(self, event=None):
        event = event if event is not None else _HostEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostEvent(torch.cpu.Event):
    """A CUDA-event stand-in; accepts ``enable_timing=`` etc. like ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass


_HOST_STREAM = _HostStream()


def _current_device() -> int:
    return 0


def _current_stream(device=None) -> _HostStream:
    return _HOST_STREAM


PATCH = Patch(
    "cpu_torch_cuda",
    target=("torch.cuda.current_device, Stream, Event, current_stream, default_stream, stream, "
            "synchronize, as megatron-core 0.16.1 calls them"),
    why=__doc__,
    obsolete_when="cpu_device_arguments is obsolete (megatron-core no longer assumes CUDA).",
    probe=lambda original: not has_accelerator(),
    swaps=lambda: [
        (torch.cuda, "current_device", _current_device),
        (torch.cuda, "Stream", _HostStream),
        (torch.cuda, "Event", _HostEvent),
        (torch.cuda, "current_stream", _current_stream),
        (torch.cuda, "default_stream", _current_stream),
        (torch.cuda, "stream", torch.cpu.stream),
        (torch.cuda, "synchronize", torch.cpu.synchronize),
    ],
)
