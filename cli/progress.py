"""Progress rendering for the library's callbacks: rich bars on a terminal, plain lines when the
output is a file or a pipe (no carriage-return redraws in logs)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class ItemRate(ProgressColumn):
    """Items per second of one task (rich's own speed columns speak bytes)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed:  # rich needs two updates for a speed; one batch is enough here
            speed = task.completed / task.elapsed
        unit = task.fields.get("unit", "items")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"? {unit}/s", style="progress.data.speed")


class ExtractBars:
    """One bar per modality for `extract()`'s on_phase / on_items callbacks: items done of this
    rank's items, rate, time remaining. Reusable across several extractions (the demo, input-level
    robustness): the bars show while one runs and stop when its texts are done. Pass
    `**bars.callbacks()` to extract(); use as a context manager so an error also stops them.

    On a console that is not a terminal rich draws nothing live (no carriage-return redraws in a
    log file); each phase's end is printed as one line instead."""

    UNITS = {"image": "images", "text": "texts"}

    def __init__(self, console: Console, rank_label: str = ""):
        self.console = console
        self.rank_label = rank_label
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.current: str | None = None

    def __enter__(self) -> "ExtractBars":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 ItemRate(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, transient=False, disable=not self.live)
        # images run first; each clock starts with its phase
        self.tasks = {m: self.progress.add_task(f"{u}{self.rank_label}", total=None, unit=u, start=False)
                      for m, u in self.UNITS.items()}
        self.progress.start()

    def on_phase(self, modality: str, items: int) -> None:
        self._end_phase()
        if self.progress is None:
            self._start()
        self.current = modality
        self.progress.update(self.tasks[modality], total=items)
        self.progress.start_task(self.tasks[modality])
        self._stop_when_done()

    def on_items(self, modality: str, n: int) -> None:
        if self.progress is None:  # a straddling item's second batch (n = 0) after the last count
            return
        self.progress.advance(self.tasks[modality], n)
        self._stop_when_done()

    def _stop_when_done(self) -> None:
        task = self.progress.tasks[self.tasks[self.current]]
        if self.current == "text" and task.completed >= (task.total or 0):
            self.close()

    def _end_phase(self) -> None:
        if self.current is None or self.progress is None:
            return
        task = self.progress.tasks[self.tasks[self.current]]
        if not self.live:
            rate = task.completed / task.elapsed if task.elapsed else 0.0
            self.console.print(f"{self.UNITS[self.current]}{self.rank_label}: {task.completed:.0f}/"
                               f"{task.total or 0:.0f} encoded in {task.elapsed or 0:.1f}s "
                               f"({rate:,.1f} {self.UNITS[self.current]}/s)", markup=False, highlight=False)
        self.current = None

    def close(self) -> None:
        """Stop the bars of the extraction in progress (if any); the next on_phase starts anew."""
        self._end_phase()
        if self.progress is not None:
            self.progress.stop()
        self.progress = None

    def callbacks(self) -> dict:
        return {"on_phase": self.on_phase, "on_items": self.on_items}
