"""Progress lines for long data jobs: counts and rates (documents, MB, tokens per second).

Plain lines on stderr rather than a redrawn bar: they survive log files, `tee` and cluster job
logs, which is where preprocessing output usually ends up (Megatron-LM prints lines too).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional, TextIO


@dataclass
class Throughput:
    """Running totals of a job and the rates since it started."""

    documents: int = 0
    """Documents (records) processed."""

    bytes: int = 0
    """Input bytes processed."""

    tokens: int = 0
    """Tokens produced (including appended end-of-document ids)."""

    start: float = field(default_factory=time.perf_counter)
    """`time.perf_counter()` when the job started."""

    def add(self, documents: int = 0, nbytes: int = 0, tokens: int = 0) -> None:
        self.documents += documents
        self.bytes += nbytes
        self.tokens += tokens

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def summary(self) -> str:
        seconds = self.elapsed
        return (
            f"{self.documents:,} documents, {self.bytes / 1e6:,.2f} MB, {self.tokens:,} tokens "
            f"in {seconds:.2f} s ({self.documents / seconds:,.0f} docs/s, "
            f"{self.bytes / 1e6 / seconds:,.2f} MB/s, {self.tokens / seconds:,.0f} tokens/s)"
        )


class ProgressPrinter:
    """Prints `Throughput.summary()` every `interval` documents to `stream` (stderr by default)."""

    def __init__(self, interval: int, stream: Optional[TextIO] = None, prefix: str = "Processed"):
        self.interval = max(1, int(interval))
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix
        self._next = self.interval

    def update(self, totals: Throughput) -> None:
        if totals.documents >= self._next:
            self._next = (totals.documents // self.interval + 1) * self.interval
            self.line(f"{self.prefix} {totals.summary()}")

    def line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
