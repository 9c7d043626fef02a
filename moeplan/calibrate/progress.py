"""A progress bar (rich) for long measurements, shown by one rank only."""

from __future__ import annotations


class Progress:
    def __init__(self, show: bool, total: int):
        self.show, self.total, self._bar, self._task = show, total, None, None

    def __enter__(self) -> "Progress":
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description:<20}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("profiling", total=self.total)
        return self

    def step(self, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=what)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
