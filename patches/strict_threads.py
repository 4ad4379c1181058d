"""Strict device mode (``SPANNORM_STRICT_DEVICES=1``, CPU runtime only): in every thread.

A torch-function mode is per thread: the CPU runtime's mode, which carries strict device mode's
bookkeeping, sits only on the stacks of the threads that pushed it. On any other thread a tensor
made without ``device=`` would go unrecorded (counted as a device tensor) and its mixing with
device tensors unchecked, although on a GPU it would be in host memory all the same. So while
strict device mode is on, every thread started through ``threading.Thread.start`` (thread pools
and timers too) runs its target with the mode pushed, and pops it when the target returns.
Threads started before, or through ``_thread`` directly, are not covered. A check, not a way to
train.
"""

from __future__ import annotations

import functools
import threading

from torch.overrides import _get_current_function_mode_stack

from spannorm_megatron.runtime.device import has_accelerator
from spannorm_megatron.runtime.strict_devices import strict_devices_requested

from .contract import Patch
from .cpu_device_arguments import MODE, mode_active


def _swaps():
    start = threading.Thread.start

    @functools.wraps(start)
    def start_under_the_mode(self):
        run = self.run

        def run_under_the_mode():
            pushed = not mode_active()
            if pushed:
                MODE.__enter__()
            try:
                run()
            finally:
                # Popped before the thread ends: a mode left in its thread-local stack would be
                # released by a C++ destructor at thread exit, which needs the GIL, and a daemon
                # thread (multiprocessing's queue feeders) ending while the interpreter shuts
                # down cannot take it: the process aborts ("terminate called without an active
                # exception").
                if pushed and _get_current_function_mode_stack()[-1:] == [MODE]:
                    MODE.__exit__(None, None, None)

        self.run = run_under_the_mode
        return start(self)

    return [(threading.Thread, "start", start_under_the_mode)]


PATCH = Patch(
    "strict_threads",
    target="threading.Thread.start (any Python): the new thread's torch-function mode stack",
    why=__doc__,
    obsolete_when="never: a test aid, applied only when SPANNORM_STRICT_DEVICES is set.",
    probe=lambda original: strict_devices_requested() and not has_accelerator(),
    swaps=_swaps,
)
