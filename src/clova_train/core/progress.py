"""Rich progress bars for long work, shared by every stage."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(
    description: str, total: float | None, *, enabled: bool = True, unit: str = "items"
) -> Iterator[Callable[[float], None]]:
    """Yield ``advance(n)`` for a bar on stderr; ``unit="bytes"`` shows MB and MB/s."""
    if unit == "bytes":
        cols = [DownloadColumn(), TransferSpeedColumn()]
    else:
        cols = [MofNCompleteColumn()]
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *cols,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)

