"""Live progress of a run: a bar per node on a terminal, a line per change elsewhere.

Pass an instance as ``on_progress`` to ``Run.wait``::

    with ProgressDisplay() as progress:
        run.wait(on_progress=progress)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from coordinator.records import RunStatus
from worker_tasks.tracking import JobState, error_line


class ProgressDisplay:
    """Shows a run's progress on ``stream`` (stderr by default).

    Parameters:
        stream: where to draw.
        live: force bars (True) or plain lines (False); default: bars on a terminal.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.console = Console(file=self.stream, force_terminal=self.live or None)
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.seen: dict[str, set[tuple[JobState, int]]] = {}  # job -> (state, attempt) seen
        self.ended: set[str] = set()  # jobs a line has shown final: the count the lines give

    def __enter__(self) -> ProgressDisplay:
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[detail]}"),
                console=self.console, refresh_per_second=4,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def notice(self, fallback: Callable[[str], None]) -> Callable[[str], None]:
        """A notice printer that does not tear the bars (``fallback`` without bars)."""
        def show(line: str) -> None:
            if self.progress is not None:
                self.progress.console.print(f"coordinator: {line}", markup=False,
                                            highlight=False)
            else:
                fallback(line)

        return show

    def __call__(self, status: RunStatus) -> None:
        if self.progress is not None:
            self._draw_bars(status)
        else:
            self._print_changes(status)

    def _draw_bars(self, status: RunStatus) -> None:
        assert self.progress is not None
        rows = {"all": status.jobs, **status.by_node()}
        for name, jobs in rows.items():
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=len(jobs), detail="")
            done = sum(1 for job in jobs if job.state.is_final)
            failed = sum(1 for job in jobs if job.state is JobState.FAILED)
            running = [job.job_id for job in jobs if job.state is JobState.RUNNING]
            detail = f"running {running[0]}" if name != "all" and running else ""
            if name == "all":
                detail = status.counts_text()
            elif failed:
                detail = f"{detail}  [red]{failed} failed[/red]".strip()
            self.progress.update(self.tasks[name], completed=done, detail=detail)

    def _print_changes(self, status: RunStatus) -> None:
        stamp = time.strftime("%H:%M:%S")
        for job in status.jobs:
            key = (job.state, job.attempts)
            seen = self.seen.setdefault(job.job_id, set())
            if key in seen:  # each state of each attempt once, even if a snapshot repeats it
                continue
            first = not seen
            seen.add(key)
            if (first and job.state is JobState.QUEUED) or job.state is JobState.FINISHING:
                continue  # (finishing lasts a few milliseconds: its marker being written)
            extra = ""
            if job.state.is_final and job.duration_s is not None:
                extra = f" in {job.duration_s:.1f} s"
            if job.state is JobState.FAILED and job.error:
                extra += f": {error_line(job.error)}"  # one line: the script's reason too
            # The count grows line by line from 0: a snapshot holding several ends at once
            # (the first one, say) does not put its total on its first line.
            if job.state.is_final:
                self.ended.add(job.job_id)
            else:
                self.ended.discard(job.job_id)  # retried: it is under way again
            self.stream.write(f"{stamp} [{job.node}] {job.job_id} {job.state}{extra}"
                              f"  ({len(self.ended)}/{status.total})\n")
        self.stream.flush()
