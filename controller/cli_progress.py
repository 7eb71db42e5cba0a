"""Progress of a long data command: a rich bar on a terminal, plain periodic lines otherwise.

Fed `scheduler.ingest.ImportProgress` snapshots (one per written chunk); the bar's total is
the input's bytes, and it shows rows, tokens and tokens/s. Without a terminal (CI logs,
pipes) it prints one line at most every `interval_s` seconds, so a log stays readable.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ImportProgressView:
    """Context manager; `update(progress)` after each chunk, `stop()` before an error."""

    def __init__(self, console: Console, *, interval_s: float = 5.0):
        self.console, self.interval_s = console, interval_s
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last = 0.0

    def __enter__(self) -> ImportProgressView:
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("importing"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                TextColumn("{task.fields[rows]:,} rows  {task.fields[tokens]:,} tokens  "
                           "{task.fields[rate]:,.0f} tokens/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                transient=True)
            self._bar.start()
            self._task = self._bar.add_task("import", total=None, rows=0, tokens=0, rate=0.0)
        self._last = time.monotonic()
        return self

    def update(self, p) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=max(p.bytes_total, 1), completed=p.bytes_done,
                             rows=p.num_rows, tokens=p.num_tokens, rate=p.tokens_per_s)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            share = p.bytes_done / p.bytes_total if p.bytes_total else 0.0
            self.console.print(f"importing: {share:.0%} of input, {p.num_rows:,} rows, "
                               f"{p.num_tokens:,} tokens, {p.tokens_per_s:,.0f} tokens/s",
                               highlight=False)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __exit__(self, *exc) -> None:
        self.stop()
