"""A worker stops in bounded time, whether or not its broker answers.

Celery's warm shutdown (SIGTERM) lets the running job finish, then acknowledges it
and closes its connections; with the broker gone (a dead head node, ``cluster down``
while Redis is away, a SIGKILLed ``coordinator local``) that last step retries for
ever and the worker never exits. So from the moment a shutdown begins, a watchdog
thread of the worker's main process waits for the running job to end (a warm stop
keeps that promise), then gives the worker ``SC_STOP_GRACE`` seconds to exit by
itself; past that it kills its pool processes (and with them, through the runner's
death signal, anything they started) and exits. A cold shutdown (SIGQUIT) gets the
same grace from the signal on.

Parameters (environment):
    SC_STOP_GRACE   seconds a stopping worker has once no job runs (default 10)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_shutting_down

from worker_tasks.daemon import WARM_JOB_NAME

logger = logging.getLogger(__name__)

STOP_GRACE_S = float(os.environ.get("SC_STOP_GRACE", "10"))
# How often the watchdog looks whether the running job has ended (seconds).
POLL_S = 0.2
# The exit status of a worker the watchdog ended (it did not stop by itself).
FORCED_EXIT_STATUS = 3


def parents() -> dict[int, int]:
    """pid -> parent pid of every process in sight."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError), \
                open(f"/proc/{entry}/stat") as fh:
            found[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
    return found


def job_running() -> bool:
    """A job's script still runs: a pool process of this worker has a child (a cold job's
    runner), or its zygote has a warm job's runner (named so: a spare waiting for its job
    is no job, and a zygote always keeps some).

    Not Celery's own count of active requests: with the broker gone, a finished job's
    request is never completed, and that count stays at one for ever.
    """
    family = parents()
    children = {pid for pid, parent in family.items() if parent == os.getpid()}
    zygotes = {pid for pid in children if is_zygote(pid)}
    return any(parent in children and (parent not in zygotes or is_warm_job(pid))
               for pid, parent in family.items())


def is_zygote(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return b"worker_tasks.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def is_warm_job(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() == WARM_JOB_NAME
    return False


def kill_children() -> None:
    """SIGKILL the worker's own children (its pool); their runners take the scripts."""
    for pid, parent in parents().items():
        if parent == os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def watch(how: str, grace: float = STOP_GRACE_S) -> None:
    """Wait for the running job (a warm stop), then ``grace`` seconds; then end the worker."""
    if how.lower() == "warm":
        while job_running():
            time.sleep(POLL_S)
    time.sleep(grace)
    logger.error("worker still stopping %g s after its last job ended (is the broker "
                 "reachable?): killing its pool and exiting", grace)
    kill_children()
    os._exit(FORCED_EXIT_STATUS)


@worker_shutting_down.connect
def on_worker_shutting_down(sender: Any = None, how: str = "Warm", **kwargs: Any) -> None:
    logger.warning("%s shutdown: this worker exits at the latest %g s after its last job",
                   how, STOP_GRACE_S)
    threading.Thread(target=watch, args=(how,), name="stop-watchdog", daemon=True).start()
