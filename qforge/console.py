"""What the CLI shows while it works, on stderr so stdout stays the answer a script reads:
rich progress bars on a terminal, one line per step where nobody watches a bar (CI logs)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from app.schemas import JobOut


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


class JobDisplay:
    """One job's progress: a bar for the whole job and its current step. Use as a context
    manager; `job` takes the SDK's updates, `local` quantcore's own progress calls."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        self.console = console or stderr_console()
        self.label = label
        self._last_line: tuple | None = None
        self._progress = None
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[step]}"), TimeElapsedColumn(), console=self.console,
                redirect_stdout=False,  # stdout is the command's answer (a job id, JSON), never the bar's
            )
            self._task = self._progress.add_task(label, total=100.0, step="")

    def __enter__(self) -> JobDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._progress is not None:
            self._progress.stop()

    def show(self, status: str, stage: str | None, current: int, total: int, percent: float, message: str = "") -> None:
        step = f"{status}: {stage or 'waiting'}" + (f" {current}/{total}" if total > 1 else "")
        if self._progress is not None:
            self._progress.update(self._task, completed=percent, step=step)
            return
        # a log: a line when the status or the stage changes, not one per layer
        if (status, stage) != self._last_line:
            self._last_line = (status, stage)
            line = f"{self.label}: {step} ({percent:.0f} %){' ' + message if message else ''}"
            self.console.print(line, soft_wrap=True)  # a log line is never wrapped at a made-up width

    def job(self, job: JobOut) -> None:
        percent = 100.0 if job.status == "succeeded" else job.progress.percent
        self.show(job.status.value, job.progress.stage, job.progress.current, job.progress.total, percent)

    def local(self, stage: str, current: int, total: int, message: str = "") -> None:
        from worker.progress import overall_percent  # the worker's formula, so both show the same

        self.show("running", stage, current, total, overall_percent(stage, current, total), message)


def bytes_display(name: str, console: Console | None = None) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(show, close) for a download: a transfer bar on a terminal, nothing in a log."""
    console = console or stderr_console()
    if not console.is_terminal:
        return lambda done, total: None, lambda: None
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
        redirect_stdout=False,
    )
    task = progress.add_task(name, total=None)
    progress.start()
    return lambda done, total: progress.update(task, completed=done, total=total), progress.stop
