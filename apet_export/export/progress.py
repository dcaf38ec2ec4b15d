"""Build progress: rich's live spinner on a terminal, one plain line per stage in logs (CI, pipes)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class PlainProgress:
    """The part of rich's Progress that build() uses, printing each stage as it starts (rich redraws a
    live display in place, which a log only receives at the end, or never when the build is killed)."""

    def __init__(self, console: Console):
        self.console, self.start = console, time.perf_counter()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: int = 1) -> str:
        elapsed = time.perf_counter() - self.start
        self.console.print(f"[{elapsed:6.1f} s] {description}", markup=False, highlight=False, soft_wrap=True)
        return description

    def update(self, task, completed: int = 1) -> None:
        pass


def stage_progress(console: Console):
    """A context manager with add_task(description) and update(task, completed=1)."""
    if console.is_terminal:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        return Progress(*columns, console=console, transient=False)
    return PlainProgress(console)
