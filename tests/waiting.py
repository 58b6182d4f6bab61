"""Waiting on events with a deadline (never a fixed sleep), and whether a process lives."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             every: float = 0.2, seen: Callable[[], str] | None = None) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` once ``timeout`` s pass.

    ``seen``, if given, says what was there instead (its text ends the failure message).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    instead = f"; instead:\n{seen()}" if seen is not None else ""
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{instead}")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has already died)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
def pool_process(main: int) -> int:
    """The worker's pool process (concurrency 1): the child of ``main`` Celery titles so
    (looked for until it is seen: on a loaded machine its title may come late)."""
    found: list[int] = []

    def seen() -> bool:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == main and b"ForkPoolWorker" in cmdline:
                found.append(int(entry.name))
                return True
        return False

    wait_for(seen, 10, f"worker {main}'s pool process")
    return found[0]
