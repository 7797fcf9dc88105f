"""A progress bar over the e2e runs that keeps every log line.

On a terminal it is a rich live bar at the bottom of the console, and the console's own ``log``
lines (the runner's line as each run starts and ends) print above it. Off a terminal (CI, a log
through ``tee`` as in ``gpu_suite.sh``) a live bar would only be printed once, at the end, so none
is drawn: each finished run logs one plain line instead (runs done, time spent, time left).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RunBar:
    """Progress over a known number of runs on ``console``: ``over(total)`` around the runs,
    ``begin(name)`` as each starts, ``done()`` as each ends."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def over(self, total: int) -> Iterator[RunBar]:
        """Show the bar (on a terminal) while the block runs ``total`` runs."""
        self._total, self._done, self._t0 = total, 0, time.monotonic()
        # markup off: configuration ids such as "R1[layers=2]" are not rich markup
        self._progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("~{task.fields[left]} left", markup=False),
            console=self.console, disable=not self.console.is_terminal,
        )
        self._task = self._progress.add_task("runs", total=total, left="?")
        self._progress.start()
        try:
            yield self
        finally:
            self._progress.update(self._task, description="runs")  # not the last run's name
            self._progress.stop()

    def begin(self, name: str) -> None:
        """The run ``name`` starts (the bar shows it)."""
        self._progress.update(self._task, description=name)

    def done(self) -> None:
        """One more run has ended; off a terminal, log where the runs stand."""
        self._done += 1
        spent = time.monotonic() - self._t0
        left = _clock(spent / self._done * (self._total - self._done))
        self._progress.update(self._task, advance=1, left=left)
        if not self.console.is_terminal:
            self.console.log(f"runs {self._done}/{self._total} done, {_clock(spent)} spent, ~{left} left")


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
