"""The training log's lines, written and read in one place: Megatron-LM's iteration line (with
throughput and MFU appended) and its validation line, and the parser that reads them back.

    [2026-01-01 12:00:00] iteration       10/     300 | consumed samples:           80 |
      elapsed time per iteration (ms): 120.5 | learning rate: 1.000000E-03 | ... |
    validation loss at iteration 100 | lm loss value: 4.100000E+00 | lm loss PPL: 6.0E+01 |

The printed text is Megatron-LM's, byte for byte (stored logs and the lab's reports are read
with `parse_train_line` / `parse_validation_line`). The parser also reads other spellings the
same fields take in older logs: "NAN"/"INF" as well as "nan"/"inf", and "n/a" (no value on this
rank) as None.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Dict, List, Optional, Tuple


def log_line(iteration: int, train_iters: int, consumed_samples: int, step_seconds: float,
             result, global_batch_size: int, tokens_per_second: float,
             mfu: Optional[float], skipped_total: int, *,
             learning_rate: Optional[float] = None, tflops: Optional[float] = None,
             num_zeros: Optional[float] = None, params_norm: Optional[float] = None,
             loss_scale: float = 1.0, now: Optional[datetime] = None) -> str:
    """Megatron-LM's training log line, with throughput and MFU appended. `result` is the
    step's `training.loop.StepResult` (its loss, grad norm and learning rate); `learning_rate`:
    the one to print (default: the step's); `tflops` (--log-throughput), `num_zeros`
    (--log-num-zeros-in-grad) and `params_norm` (--log-params-norm) where Megatron-LM prints
    them; `loss_scale` always, as Megatron-LM does (1.0 without a loss scaler); `now`: the
    time stamp (default: now)."""
    learning_rate = result.learning_rate if learning_rate is None else learning_rate
    now = datetime.now() if now is None else now
    parts = [
        f" [{now:%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {step_seconds * 1000:.1f}",
    ]
    if tflops is not None:
        parts.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
    parts += [
        f"learning rate: {learning_rate:.6E}",
        f"global batch size: {global_batch_size:5d}",
        f"lm loss: {result.loss:.6E}" if result.loss is not None else "lm loss: n/a",
        f"loss scale: {loss_scale:.1f}",
        f"grad norm: {result.grad_norm:.3f}" if result.grad_norm is not None else "grad norm: n/a",
    ]
    if num_zeros is not None:
        parts.append(f"num zeros: {num_zeros}")
    if params_norm is not None:
        parts.append(f"params norm: {params_norm:.3f}")
    parts += [
        f"number of skipped iterations: {skipped_total:3d}",
        f"tokens/s: {tokens_per_second:.0f}",
    ]
    if mfu is not None:
        parts.append(f"MFU: {mfu * 100:.2f}%")
    return " | ".join(parts) + " |"


def validation_line(iteration: int, loss: float) -> str:
    """Megatron-LM's validation report: the line between two rules of dashes (the perplexity
    capped at exp(20), where a collapsed or diverging run would overflow it; a loss that is
    not a number has no perplexity either)."""
    bar = "-" * 100
    ppl = math.exp(min(20.0, loss)) if not math.isnan(loss) else math.nan
    return (f"{bar}\n validation loss at iteration {iteration} | lm loss value: "
            f"{loss:.6E} | lm loss PPL: {ppl:.6E} | \n{bar}")


# ------------------------------------------------------------------------------ the parser
def _number(text: str) -> Optional[float]:
    text = text.strip()
    if text.lower() == "n/a":
        return None
    return float(text)  # float() reads nan/NAN/inf/INF/infinity


def _whole(text: str) -> Optional[int]:
    value = _number(text)
    return None if value is None else int(value)


def _percent(text: str) -> Optional[float]:
    value = _number(text.strip().rstrip("%"))
    return None if value is None else value / 100


@dataclass
class TrainLine:
    """The fields of one iteration line (None: not printed, or "n/a")."""

    iteration: int
    train_iters: int
    time: Optional[datetime] = None
    consumed_samples: Optional[int] = None
    step_ms: Optional[float] = None
    tflops: Optional[float] = None
    learning_rate: Optional[float] = None
    global_batch_size: Optional[int] = None
    lm_loss: Optional[float] = None
    loss_scale: Optional[float] = None
    grad_norm: Optional[float] = None
    num_zeros: Optional[float] = None
    params_norm: Optional[float] = None
    skipped: Optional[int] = None
    """Skipped iterations so far (the line's running total)."""
    tokens_per_second: Optional[float] = None
    mfu: Optional[float] = None
    """A fraction (the line prints a percentage)."""


@dataclass
class ValidationLine:
    iteration: int
    lm_loss: Optional[float]
    ppl: Optional[float]


# label printed by `log_line` -> (TrainLine field, how its text is read)
FIELDS: Dict[str, Tuple[str, Callable[[str], object]]] = {
    "consumed samples": ("consumed_samples", _whole),
    "elapsed time per iteration (ms)": ("step_ms", _number),
    "throughput per gpu (tflop/s/gpu)": ("tflops", _number),
    "learning rate": ("learning_rate", _number),
    "global batch size": ("global_batch_size", _whole),
    "lm loss": ("lm_loss", _number),
    "loss scale": ("loss_scale", _number),
    "grad norm": ("grad_norm", _number),
    "num zeros": ("num_zeros", _number),
    "params norm": ("params_norm", _number),
    "number of skipped iterations": ("skipped", _whole),
    "tokens/s": ("tokens_per_second", _number),
    "mfu": ("mfu", _percent),
}
_ITERATION = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)")
_TIME = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]\s*$")
_VALIDATION = re.compile(r"validation loss at iteration\s+(\d+)")


def _labelled(text: str) -> Dict[str, str]:
    """{label (lower case): value text} of the ` | label: value` parts of a line."""
    out = {}
    for part in text.split("|"):
        label, colon, value = part.rpartition(":")
        if colon and label.strip():
            out[label.strip().lower()] = value.strip()
    return out


def parse_train_line(line: str) -> Optional[TrainLine]:
    """The fields of an iteration line (one that names an iteration and the lm loss), else
    None. A field whose text is not a number is left None."""
    found = _ITERATION.search(line)
    if not found or "lm loss" not in line.lower() or _VALIDATION.search(line):
        return None
    parsed = TrainLine(iteration=int(found.group(1)), train_iters=int(found.group(2)))
    stamp = _TIME.search(line[:found.start()])
    if stamp:
        parsed.time = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
    for label, text in _labelled(line[found.end():]).items():
        if label in FIELDS:
            name, read = FIELDS[label]
            try:
                setattr(parsed, name, read(text))
            except ValueError:
                pass
    return parsed


def parse_validation_line(line: str) -> Optional[ValidationLine]:
    """The iteration and losses of a validation line, else None."""
    found = _VALIDATION.search(line)
    if not found:
        return None
    values = _labelled(line[found.end():])

    def number(label):
        try:
            return _number(values[label]) if label in values else None
        except ValueError:
            return None
    return ValidationLine(int(found.group(1)), number("lm loss value"), number("lm loss ppl"))


def parse_lines(text: str) -> Tuple[List[TrainLine], List[ValidationLine]]:
    """Every iteration line and every validation line of a log, in order."""
    train, valid = [], []
    for line in text.splitlines():
        validation = parse_validation_line(line)
        if validation is not None:
            valid.append(validation)
            continue
        parsed = parse_train_line(line)
        if parsed is not None:
            train.append(parsed)
    return train, valid


__all__ = ["FIELDS", "TrainLine", "ValidationLine", "log_line", "parse_lines", "parse_train_line",
           "parse_validation_line", "validation_line"]
