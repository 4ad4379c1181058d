"""What a loss spike is: one rule, for the running guard (`training.guards`, the
--loss-spike-factor / --loss-spike-window flags) and for the lab's reading of finished runs
(`lab.training_log`).

A finite loss is a spike when it exceeds `factor` x the median of the last `window` finite
losses before it, once `WARMUP` of them have been seen (the first few losses of a run fall
fast and say nothing about spikes). A spike still enters the window. Non-finite losses are not
spikes and do not enter the window: the non-finite guard skips those steps, and the lab counts
them as divergence.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import List, Optional, Sequence

WARMUP = 5
"""Finite losses the window must hold before a loss is judged."""


class SpikeDetector:
    """A loss above `factor` x the running median of the last `window` losses is a spike (see
    the module doc)."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent = deque(maxlen=window)

    def check(self, loss: Optional[float]) -> Optional[float]:
        """The running median when `loss` is a spike, else None. Non-finite losses are not
        counted here (NonFiniteGuard handles them)."""
        if loss is None or not math.isfinite(loss):
            return None
        median = statistics.median(self.recent) if len(self.recent) >= WARMUP else None
        self.recent.append(loss)
        if median is not None and loss > self.factor * median:
            return median
        return None


def find_spikes(iterations: Sequence[int], losses: Sequence[Optional[float]], factor: float,
                window: int) -> List[int]:
    """The iterations whose loss `SpikeDetector(factor, window)` flags, fed in order (None and
    non-finite losses are passed over)."""
    detector = SpikeDetector(factor, window)
    return [iteration for iteration, loss in zip(iterations, losses)
            if detector.check(loss) is not None]


__all__ = ["SpikeDetector", "WARMUP", "find_spikes"]
