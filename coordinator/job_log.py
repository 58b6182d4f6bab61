"""A job's log, wherever it was written (``coordinator log``).

The worker appends every attempt of a job to one log file, each attempt opened by a line
``[scripts-coordinator] attempt N of JOB on HOST ...``. The file is on this machine when
the workers' workdir is shared (or the run was local), else on the disk of the node that
ran the attempt, read over SFTP through the inventory.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.errors import InvalidJobsError, NodeFailedError
from coordinator.records import JobRecord

if TYPE_CHECKING:
    from coordinator.cluster.inventory import Inventory
    from coordinator.cluster.remote import RemoteNode

# The line the worker writes at the start of each attempt (run_job.log_line).
ATTEMPT_LINE = re.compile(r"\[scripts-coordinator\] attempt (\d+) of ")
# How often --follow looks for more (seconds).
FOLLOW_POLL_S = 0.5


class LocalLog:
    """The log file on this machine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    def read(self, offset: int) -> bytes:
        try:
            with self.path.open("rb") as fh:
                fh.seek(offset)
                return fh.read()
        except FileNotFoundError:
            return b""

    def close(self) -> None:
        pass


class NodeLog:
    """The log file on a node's own disk, over one SFTP session."""

    def __init__(self, remote: RemoteNode, path: str) -> None:
        self.remote = remote
        self.path = path
        self.where = f"{remote.label}:{path}"
        from coordinator.cluster.remote import NodeError

        try:
            self.sftp = remote.sftp()
        except NodeError as err:
            raise NodeFailedError(f"could not read {self.where}: {err}") from None

    def read(self, offset: int) -> bytes:
        try:
            with self.sftp.open(self.path, "rb") as fh:
                fh.seek(offset)
                return bytes(fh.read())
        except FileNotFoundError:
            return b""
        except OSError as err:
            raise NodeFailedError(f"could not read {self.where}: {err}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.close()
        self.remote.close()


def open_log(job: JobRecord, workdir: Path, inventory: Inventory | None,
             attempt: int | None = None) -> LocalLog | NodeLog:
    """Where ``job``'s log is: the worker's directory or ``workdir`` here, else the node that
    ran ``attempt`` (default: the last), through ``inventory``."""
    if not job.log_file:
        raise InvalidJobsError(f"job {job.job_id} has no log file recorded")
    node = node_of_attempt(job, attempt)
    if inventory is not None and node in inventory.nodes \
            and not inventory.nodes[node].config.shared_storage:
        # The node's own disk has it: a path here of the same name would be another file.
        from coordinator.cluster.remote import RemoteNode

        config = inventory.nodes[node]
        return NodeLog(RemoteNode(config), posixpath.join(config.config.workdir, job.log_file))
    for base in ([Path(job.workdir)] if job.workdir else []) + [workdir]:
        path = base / job.log_file
        if path.exists():
            return LocalLog(path)
    return LocalLog(workdir / job.log_file)  # not written yet: --follow waits for it


def node_of_attempt(job: JobRecord, attempt: int | None) -> str:
    entries = [entry for entry in job.history
               if attempt is None or entry.get("attempt") == attempt]
    return str((entries[-1].get("node") if entries else None) or job.node)


def attempt_section(text: str, attempt: int) -> str:
    """The lines of attempt ``attempt`` (from its opening line to the next attempt's)."""
    kept: list[str] = []
    current = None
    for line in text.splitlines(keepends=True):
        match = ATTEMPT_LINE.match(line)
        if match:
            current = int(match.group(1))
        if current == attempt:
            kept.append(line)
    return "".join(kept)


def follow(log: LocalLog | NodeLog, finished: Callable[[], bool],
           poll: float = FOLLOW_POLL_S) -> Iterator[bytes]:
    """The log as it grows, until the job is final and nothing more came (Ctrl-C stops it
    sooner)."""
    offset = 0
    while True:
        done = finished()  # read before the file: what it wrote before ending is shown
        chunk = log.read(offset)
        if chunk:
            offset += len(chunk)
            yield chunk
        elif done:
            return
        else:
            time.sleep(poll)


def job_record(status: Any, job_id: str) -> JobRecord:
    for job in status.jobs:
        if job.job_id == job_id:
            return job
    raise InvalidJobsError(f"run {status.run_id} has no job {job_id!r}")
