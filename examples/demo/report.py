"""What the demo prints: progress lines with the time, the summary table, logs.

Every line goes to one stream (standard output when run as a command), so
that a test reads the demo exactly as a user sees it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import attrs

__all__ = ["Report", "Row"]


@attrs.frozen
class Row:
    """One line of the summary table."""

    capability: str
    worker: str
    answer: str
    latency_ms: float


@attrs.define
class Report:
    """The demo's output, and the rows and notes of its summary."""

    out: IO[str]
    started: float = attrs.field(factory=time.monotonic)
    rows: list[Row] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def say(self, message: str) -> None:
        """Print a progress line with the time since the start."""
        self.print(f"[{time.monotonic() - self.started:5.1f}s] {message}")

    def print(self, text: str) -> None:
        """Print ``text`` as it is."""
        print(text, file=self.out, flush=True)

    def print_summary(self, workers: int) -> None:
        """The table of every row, the notes, and the closing line."""
        headers = ("capability", "worker", "answer", "latency")
        cells = [(r.capability, r.worker, r.answer, f"{r.latency_ms:.0f} ms") for r in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        lines = ["", "Summary", _aligned(headers, widths), "  ".join("-" * w for w in widths)]
        lines += [_aligned(row, widths) for row in cells]
        lines += [f"* {note}" for note in self.notes]
        lines += [
            "",
            f"Demo passed: {workers} workers, every capability answered and checked "
            f"({time.monotonic() - self.started:.1f} s).",
        ]
        self.print("\n".join(lines))

    def print_logs(self, tails: Mapping[Path, list[str]]) -> None:
        """The last lines of each child's log, to see why a step failed."""
        for path, tail in tails.items():
            self.print(f"--- {path.stem} ({path.name}) ---\n" + "\n".join(tail))


def _aligned(cells: tuple[str, ...], widths: list[int]) -> str:
    padded = (cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
    return "  ".join(padded).rstrip()
