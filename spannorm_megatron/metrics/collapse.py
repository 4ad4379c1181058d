"""The collapse alarm: says, once, when the lower layers of a deep model stop receiving gradient.

Why: a deep SpanNorm or PostNorm run can collapse within a few steps after warm-up (the stream's
gradient is divided by each norm on its way down, see `docs/stability/mechanism.md`), and from
then on its lower layers stop learning while the loss curve only shows a plateau near the unigram
floor. The per-layer gradient norms that `StabilitySignals` measures on logging steps show it as
it happens; this turns them into one warning naming the iteration, the layers and the ratio.

The signal is the grid's (`docs/stability/grid/`, `layer_grad_ratio`): layer 2's parameter
gradient norm over layer L's. The alarm fires at the first logging step where it is below
`threshold` (`--collapse-grad-ratio`), and not again in this process. Why layer 2 rather than 1:
layer 1 also receives gradient through SpanNorm's input norm N0 and the embedding side, and the
thresholds were chosen from the grid's measurements of layer 2. Models with fewer than 3 layers
have no lower layers to lose (layer 2 would be the last one), so the alarm stays off for them.

Where the fall began (`CollapseReport.fall_began`, what `--on-collapse rollback` rolls back
before): the logged step from which the ratio fell without a break until it crossed the
threshold (its last peak before the crossing). `rewind` forgets the steps after a
rollback point and watches again.

Pure Python on the already reduced signals (`StabilitySignals.collect()` gives every rank all
layers), so every rank reaches the same answer without a collective.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

REFERENCE_LAYER = 2


@dataclass
class CollapseReport:
    """What the alarm says when it fires."""

    iteration: int
    ratio: float
    """Layer 2's gradient norm over layer L's."""
    threshold: float
    num_layers: int
    layers: List[int]
    """Every layer below L whose gradient norm is below `threshold` x layer L's."""
    update_ratio: Optional[float]
    """Median update ratio of `layers` on this step (None when not measured)."""
    last_update_ratio: Optional[float]
    """Layer L's update ratio on this step."""
    fall_began: int = 0
    """The logged step from which the ratio fell without a break to the crossing (its last
    peak; the crossing step itself when the ratio rose into it)."""

    def message(self) -> str:
        L = self.num_layers
        updates = ""
        if self.update_ratio is not None and self.last_update_ratio is not None:
            updates = (f" Their update ratio is {self.update_ratio:.1e} (median; layer {L}: "
                       f"{self.last_update_ratio:.1e}); in the grid's collapsing runs it fell to "
                       f"about 1e-6 within tens of steps, as Adam's moments decayed.")
        return (f"collapse alarm at iteration {self.iteration}: the lower layers stopped receiving "
                f"gradient. Layer-2/{L} gradient-norm ratio {self.ratio:.1e} < {self.threshold:g} "
                f"(--collapse-grad-ratio); layers {layer_ranges(self.layers)} of {L} get less "
                f"than {self.threshold:g} x layer {L}'s gradient norm.{updates} In the 128-layer "
                f"grid every run that crossed it ended behind every run of its cell that did not "
                f"(docs/stability/collapse_alarm.md; the mechanism: docs/stability/mechanism.md).")


class CollapseAlarm:
    """Watches the per-layer gradient norms of logging steps; see the module doc.

    Args:
        threshold: fire when layer 2's gradient norm is below this x layer L's (0: never).
        num_layers: L, the whole model's layer count.
    """

    def __init__(self, threshold: float, num_layers: int):
        self.threshold = threshold
        self.num_layers = num_layers
        self.fired: Optional[CollapseReport] = None
        self.ratios: List[Tuple[int, float]] = []
        """(iteration, layer-2/L ratio) of every logged step watched so far."""

    @property
    def active(self) -> bool:
        return self.threshold > 0 and self.num_layers > REFERENCE_LAYER and self.fired is None

    def check(self, iteration: int, signals: Dict[str, Dict[int, float]]) -> Optional[CollapseReport]:
        """The report on the step that crosses the threshold; None on every other call."""
        if not self.active:
            return None
        ratio = grad_ratio(signals, self.num_layers)
        if ratio is None:
            return None
        self.ratios.append((iteration, ratio))
        if not ratio < self.threshold:
            return None
        grads = signals["grad_norm"]
        last = grads[self.num_layers]
        layers = [n for n in range(1, self.num_layers)
                  if math.isfinite(grads.get(n, math.nan)) and grads[n] < self.threshold * last]
        updates = signals.get("update_ratio") or {}
        below = [updates[n] for n in layers if n in updates and math.isfinite(updates[n])]
        self.fired = CollapseReport(
            iteration=iteration, ratio=ratio, threshold=self.threshold,
            num_layers=self.num_layers, layers=layers,
            update_ratio=statistics.median(below) if below else None,
            last_update_ratio=updates.get(self.num_layers),
            fall_began=fall_began(self.ratios))
        return self.fired

    def rewind(self, iteration: int) -> None:
        """Forget the steps after `iteration` (a rollback point) and watch again."""
        self.ratios = [(i, r) for i, r in self.ratios if i <= iteration]
        self.fired = None


def fall_began(ratios: List[Tuple[int, float]]) -> int:
    """Where the unbroken fall that ends at the last of `ratios` ((iteration, ratio) in order)
    began: walk back while each earlier ratio is higher; the iteration of the last peak."""
    start = len(ratios) - 1
    while start > 0 and ratios[start - 1][1] > ratios[start][1]:
        start -= 1
    return ratios[start][0]


def grad_ratio(signals: Dict[str, Dict[int, float]], num_layers: int) -> Optional[float]:
    """Layer 2's gradient norm over layer L's, or None where it says nothing: fewer than 3
    layers, no gradient norms on this step, or a non-finite or zero layer-L norm (a step the
    non-finite guard skips is reported by the guard)."""
    grads = signals.get("grad_norm") or {}
    if num_layers <= REFERENCE_LAYER or REFERENCE_LAYER not in grads or num_layers not in grads:
        return None
    early, last = grads[REFERENCE_LAYER], grads[num_layers]
    if not (math.isfinite(early) and math.isfinite(last)) or last <= 0:
        return None
    return early / last


def layer_ranges(layers: List[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8'."""
    parts, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts) or "none"


__all__ = ["CollapseAlarm", "CollapseReport", "fall_began", "grad_ratio", "layer_ranges"]
