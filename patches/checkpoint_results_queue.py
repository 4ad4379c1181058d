"""The checkpoint writer's results queue outlives a killed trainer (an orphan of ~370 MB).

megatron-core's ``FileSystemWriterAsync`` collects its writer processes' results through
``_get_write_results_queue()``, a ``multiprocessing.Manager().Queue()`` of the *spawn* context:
the first save starts a Manager server process, which re-imports the trainer's ``__main__``
(torch, megatron-core: about 370 MB). When the trainer is killed (SIGKILL, OOM killer, a node
going down), nothing shuts the server down: it is re-parented to init and lives on. Every
``kill -9`` of a rank leaked one (tests/test_reliability.py kills ranks).

The queue only has to carry results from processes forked by the trainer, or by a process
forked from it (megatron-core's temporal async caller), back to the trainer, which a
fork-context ``multiprocessing.Queue`` does without a server process. Its resource tracker
exits by itself when the trainer dies (it reads EOF). megatron-core's persistent async caller
(a *spawned* process) would need the Manager; this project does not use it.
"""

from __future__ import annotations

import inspect
import multiprocessing

from .contract import Patch

_ATTRIBUTE = "_get_write_results_queue"
_queue = None


def _filesystem_async():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return filesystem_async


class _ResultsQueue:
    """A fork-context queue read as megatron-core reads the Manager's: its `get_nowait()`
    follows a `put()` whose item a Manager delivers at once, but a multiprocessing queue hands
    over through a feeder thread, so it waits for the item in flight."""

    def __init__(self):
        self._queue = multiprocessing.get_context("fork").Queue()

    def put(self, item) -> None:
        self._queue.put(item)

    def get(self, *args, **kwargs):
        return self._queue.get(*args, **kwargs)

    def get_nowait(self):
        return self._queue.get(timeout=60)  # queue.Empty after that, as before


def _fork_queue():
    global _queue
    if _queue is None:
        _queue = _ResultsQueue()
    return _queue


def _probe(original) -> bool:
    upstream = original(_filesystem_async(), _ATTRIBUTE)
    return callable(upstream) and "Manager()" in inspect.getsource(upstream)


PATCH = Patch(
    "checkpoint_results_queue",
    target="megatron-core 0.16.x (seen on 0.16.1): "
           "dist_checkpointing.strategies.filesystem_async._get_write_results_queue",
    why=__doc__,
    obsolete_when="_get_write_results_queue no longer starts a multiprocessing Manager "
                  "(is_needed() then returns False).",
    probe=_probe,
    swaps=lambda: [(_filesystem_async(), _ATTRIBUTE, _fork_queue)],
)
