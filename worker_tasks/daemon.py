"""A node's worker as a background process: pid file, log file, start, stop, inspect.

``coordinator worker --detach`` and ``coordinator cluster up`` (which runs that
command on the node over SSH) start the worker in a session of its own, so it
outlives the shell or SSH connection that started it. The pid file names the
session leader; every process of that session (the Celery worker, its pool
process, the running script and the script's children) is the worker's, which
is what a hard stop kills. This module is Linux-only (it reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# How often a stop looks whether the worker has exited (seconds).
STOP_POLL_S = 0.2
# After SIGKILL, how long the kernel may take to reap the session (seconds).
KILL_SETTLE_S = 10.0
# How long a process just started may show no arguments (it is inside its exec).
EXEC_WINDOW_S = 1.0
# In the environment of every job's script (run_job.script_env): a process of a running job.
JOB_VARIABLE = b"SC_JOB_ID="
# The process name of a warm job's runner and script (forked, so their environment as the
# kernel shows it is the zygote's; ``zygote.py`` sets this name instead).
WARM_JOB_NAME = "sc-warm-job"

# Where a worker started with a workdir keeps its pid file and log, under that workdir
# (``coordinator worker``'s defaults, and every node of an inventory).
STATE_DIR = ".scripts-coordinator"

@dataclass(frozen=True)
class PidFileState:
    """What a pid file says about its worker.

    Parameters:
        pid: the pid written in the file, or None (no file, or unreadable).
        alive: that process exists and is still this node's worker.
        stale: a pid file whose process is gone (or is some other program now).
    """

    pid: int | None
    alive: bool

    @property
    def stale(self) -> bool:
        return self.pid is not None and not self.alive


def read_pidfile(pidfile: Path, marker: str) -> PidFileState:
    """The worker named by ``pidfile``; alive only if one of its arguments is ``marker``.

    The marker (the node's queue name) guards against pid reuse: after a reboot
    the number may belong to an unrelated process.
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return PidFileState(pid=None, alive=False)
    return PidFileState(pid=pid, alive=process_matches(pid, marker))


def process_matches(pid: int, marker: str) -> bool:
    """Process ``pid`` lives and ``marker`` is one of its arguments."""
    deadline = time.monotonic() + EXEC_WINDOW_S
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        # A process in the middle of its exec has no arguments yet (Popen has returned
        # by then): look again shortly.
        if cmdline or state == "Z" or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    # Celery retitles its process where setproctitle is installed: the arguments then
    # appear as one string, "[celeryd: ...] -active- (... --queues node.rig-a ...)".
    return state != "Z" and marker.encode() in re.split(rb"[\0\s(),]+", cmdline)


def session_members(sid: int) -> list[int]:
    """Every live process whose session id is ``sid`` (the worker and all it started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # Fields after the name: state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def job_processes(sid: int) -> list[int]:
    """The processes of session ``sid`` that belong to a running job (their environment
    names it: ``SC_JOB_ID``, set for every script; a warm job's, by their name)."""
    return [pid for pid in session_members(sid) if is_job_process(pid)]


def is_job_process(pid: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return name == WARM_JOB_NAME or any(entry.startswith(JOB_VARIABLE)
                                        for entry in environ.split(b"\0"))


def start_detached(argv: Sequence[str], env: Mapping[str, str], cwd: Path, pidfile: Path,
                   logfile: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, output appended to ``logfile``; write ``pidfile``."""
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as log:
        process = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    tmp = pidfile.with_name(f".{pidfile.name}.tmp")
    tmp.write_text(f"{process.pid}\n")
    os.replace(tmp, pidfile)
    return process


def stop(pidfile: Path, marker: str, now: bool = False, timeout: float = 60.0) -> str:
    """Stop the worker of ``pidfile``; returns one line saying what happened (``stop_all``)."""
    return stop_all([(pidfile, marker)], now, timeout)[0]


def stop_all(workers: Sequence[tuple[Path, str]], now: bool = False,
             timeout: float = 60.0) -> list[str]:
    """Stop the workers of these ``(pidfile, marker)`` pairs; one line each on what happened.

    Warm (default): SIGTERM to every worker first (none takes another job), then each
    finishes its running job (and writes its ``.done``) before exiting; all within
    ``timeout`` seconds together. ``now``: SIGKILL to every process of each worker's
    session, scripts included. Raises ``TimeoutError`` if a warm stop has not finished
    within ``timeout``.
    """
    lines: list[str] = []
    waiting: list[tuple[int, Path, str, bool, int]] = []
    for index, (pidfile, marker) in enumerate(workers):
        state = read_pidfile(pidfile, marker)
        lines.append("")
        if not state.alive:
            pidfile.unlink(missing_ok=True)
            lines[index] = "not running" + (f" (removed stale pid file, pid {state.pid})"
                                            if state.stale else "")
            continue
        assert state.pid is not None
        if now:
            kill_session(state.pid)
            pidfile.unlink(missing_ok=True)
            lines[index] = f"killed worker pid {state.pid} and its jobs"
            continue
        busy = bool(job_processes(state.pid))
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGTERM)
        waiting.append((state.pid, pidfile, marker, busy, index))
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for entry in list(waiting):
            pid, pidfile, marker, busy, index = entry
            if not process_matches(pid, marker):
                pidfile.unlink(missing_ok=True)
                how = "its running job finished first" if busy else "no job was running"
                lines[index] = f"stopped worker pid {pid} (warm: {how})"
                waiting.remove(entry)
        if waiting:
            time.sleep(STOP_POLL_S)
    if waiting:
        pids = ", ".join(str(entry[0]) for entry in waiting)
        who = f"worker pid {pids} is" if len(waiting) == 1 else f"workers pid {pids} are"
        raise TimeoutError(f"{who} still finishing a job after {timeout:g} s; the warm "
                           f"shutdown goes on (--now kills it)")
    return lines


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` and wait until none is left."""
    deadline = time.monotonic() + KILL_SETTLE_S
    while time.monotonic() < deadline:
        members = session_members(sid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(STOP_POLL_S)
