"""What keeps a long run alive: non-finite gradients caught before the optimizer sees them,
loss spikes noted (`training.spikes`), and clean exits on preemption (SIGTERM) or a time budget.

A run that went non-finite stops with exit status 1 and saves nothing (`NonFiniteGradientError`):
after --max-skipped-iterations skipped steps in a row, when the log window that ends it (the
steps since the previous log line, at its last iteration or at an exit) was skipped throughout,
and before any save of weights that hold NaN/Inf (a run resumed from such a checkpoint).

Each check ends in one small all-reduce so that every rank takes the same decision.
"""

from __future__ import annotations

import math
import signal
import time
from typing import List, Optional

import torch

from spannorm_megatron.checkpoint import last_good_checkpoint
from spannorm_megatron.errors import RunFailure
from spannorm_megatron.runtime import current_device
from spannorm_megatron.training.spikes import SpikeDetector


def _all_reduce(values: List[float], op) -> List[float]:
    # On the rank's device: the default group is NCCL on GPUs, which takes CUDA tensors only.
    tensor = torch.tensor(values, dtype=torch.float64, device=current_device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=op)
    return tensor.tolist()


def agree_on_any(flag: bool) -> bool:
    """Whether `flag` is true on any rank (one all-reduce): every rank then takes the same
    decision, even where a value computed on each differs in its last bit."""
    return bool(_all_reduce([float(flag)], torch.distributed.ReduceOp.MAX)[0])


_OUTSIDE = 1e12  # sorts parameters outside the transformer layers after every layer


class NonFiniteGradientError(RunFailure):
    """Training went non-finite (too many skipped steps, a log window without one update, NaN
    weights); the run stops without saving instead of diverging or writing NaN."""


class NonFiniteGuard:
    """Checks every gradient for NaN/Inf after backward and before the optimizer step.

    A bad step is skipped (no update, no scheduler step) and counted. After `max_in_a_row`
    bad steps in a row the run stops, naming the iteration and the first layer (global number)
    whose gradient went non-finite. It also keeps the current log window (`log_interval` steps,
    the last one shorter) for `check_last_window`, and checks the weights before a save
    (`check_weights`).
    """

    def __init__(self, model_chunks, max_in_a_row: int, log_interval: int = 1,
                 save_dir: Optional[str] = None):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0
        self.log_interval = log_interval
        self.save_dir = save_dir
        self.window_start: Optional[int] = None  # first iteration of the current log window
        self.window_updated = False  # whether a step of it updated the weights
        self._params = []
        orders = []  # per parameter: its global layer number, or _OUTSIDE for non-layer params
        for chunk in model_chunks:
            module = getattr(chunk, "module", chunk)
            layer_of = {}
            for layer in module.decoder.layers:
                for param in layer.parameters():
                    layer_of[id(param)] = layer.layer_number
            for param in module.parameters():
                self._params.append(param)
                orders.append(float(layer_of.get(id(param), _OUTSIDE)))
        self._orders = torch.tensor(orders, dtype=torch.float64, device=current_device())

    def first_bad_layer(self) -> Optional[int]:
        """Smallest global layer number with a non-finite gradient on any rank; 0 when only
        parameters outside the layers (embedding, output layer, final norm) have one; None when
        every gradient is finite.

        Runs on the device: one fused norm per gradient (non-finite exactly when an element is),
        the lowest offending layer picked there, one all-reduce and one host sync per step.
        """
        grads, present = [], []
        for index, param in enumerate(self._params):
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None:
                grads.append(grad)
                present.append(index)
        return self._first_non_finite(grads, present)

    def first_bad_weight_layer(self) -> Optional[int]:
        """As `first_bad_layer`, for the weights themselves."""
        return self._first_non_finite([p.detach() for p in self._params],
                                      list(range(len(self._params))))

    def _first_non_finite(self, tensors, present) -> Optional[int]:
        first = torch.full((), math.inf, dtype=torch.float64, device=current_device())
        if tensors:
            norms = torch.stack(torch._foreach_norm(tensors, dtype=torch.float32))
            order = (self._orders if len(tensors) == len(self._params)
                     else self._orders[torch.tensor(present, device=current_device())])
            first = torch.where(torch.isfinite(norms), math.inf, order).min()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        first = first.item()
        if first == math.inf:
            return None
        return 0 if first == _OUTSIDE else int(first)

    def record(self, bad_layer: Optional[int], iteration: int, *, skipped: bool = False,
               loss: Optional[float] = None) -> None:
        """After each step: `bad_layer` is what this guard found; `skipped` and `loss` say
        whether the optimizer refused the step (a loss scaler's overflow) and on what loss. A
        step counts as updated unless it was skipped as non-finite: by this guard, or by the
        optimizer on a NaN/Inf loss (an overflow at too high a loss scale is not)."""
        if self.window_start is None or (iteration - 1) % self.log_interval == 0:
            self.window_start, self.window_updated = iteration, False
        if bad_layer is None and not (skipped and (loss is None or not math.isfinite(loss))):
            self.window_updated = True
        if bad_layer is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.max_in_a_row:
            where = ("only outside the transformer layers" if bad_layer == 0
                     else f"lowest layer with a non-finite gradient: {bad_layer}")
            raise NonFiniteGradientError(
                f"iteration {iteration}: non-finite gradients for {self.in_a_row} steps in a row "
                f"({where}); stopping. Lower --lr, check the data "
                f"around this iteration, or resume from the last checkpoint with "
                f"--max-skipped-iterations raised." + self._not_saved())

    def check_last_window(self, iteration: int) -> None:
        """Where the run ends (its last iteration, or an exit): stop, saving nothing, when no
        step of the log window that ends it updated the weights."""
        if self.window_start is None or self.window_updated:
            return
        steps = (f"iteration {iteration}" if self.window_start == iteration
                 else f"iterations {self.window_start}-{iteration}")
        raise NonFiniteGradientError(
            f"{steps}, the run's last log window: every step was skipped as non-finite (NaN/Inf "
            f"gradients or loss), so the weights did not change; stopping. "
            f"Lower --lr, check the data or resume from an earlier checkpoint." + self._not_saved())

    def check_weights(self, iteration: int) -> None:
        """Before a save: a checkpoint of NaN/Inf weights cannot train, so none is written."""
        bad_layer = self.first_bad_weight_layer()
        if bad_layer is None:
            return
        where = ("outside the transformer layers" if bad_layer == 0
                 else f"lowest layer with one: {bad_layer}")
        raise NonFiniteGradientError(
            f"iteration {iteration}: the weights hold NaN/Inf values ({where}); not saving "
            f"them. Resume from an earlier checkpoint: write its iteration into "
            f"latest_checkpointed_iteration.txt." + self._not_saved())

    def _not_saved(self) -> str:
        if not self.save_dir:
            return " (No --save: this run saves nothing.)"
        return f" The run stops without a save: {last_good_checkpoint(self.save_dir)}."


class ExitConditions:
    """SIGTERM (preemption) and --exit-duration-in-mins, agreed on by every rank."""

    def __init__(self, duration_minutes: Optional[float]):
        self.start = time.time()
        self.duration_minutes = duration_minutes
        self.signal_received = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        # Only note it: the step in flight finishes, then every rank saves and exits together.
        self.signal_received = True

    def reason(self) -> Optional[str]:
        """Why the run should stop now (the same answer on every rank), or None."""
        elapsed = (time.time() - self.start) / 60.0
        over_time = self.duration_minutes is not None and elapsed > self.duration_minutes
        got_signal, over_time = _all_reduce(
            [float(self.signal_received), float(over_time)], torch.distributed.ReduceOp.MAX)
        if got_signal:
            return "received SIGTERM"
        if over_time:
            return f"exit duration of {self.duration_minutes} minutes reached"
        return None

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


__all__ = ["ExitConditions", "NonFiniteGradientError", "NonFiniteGuard", "SpikeDetector",
           "agree_on_any"]
