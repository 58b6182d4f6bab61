"""What the tracking records say about a run: typed snapshots read from Redis.

``read_status`` is the one reader of a run's records; the run handle, the
collector, the progress display and the CLI all work from its ``RunStatus``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from typing import Any

import redis

from coordinator.errors import RunNotFoundError
from worker_tasks.tracking import JobState, RunState, decode, job_key, jobs_key, run_key


@dataclass(frozen=True)
class JobRecord:
    """One job's tracked state."""

    job_id: str
    node: str
    gpu_id: int
    state: JobState
    script: str = ""
    args: list[str] = field(default_factory=list)
    attempts: int = 0
    exit_code: int | None = None
    duration_s: float | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    host: str | None = None
    error: str | None = None
    output_file: str | None = None
    done_file: str = ""
    log_file: str = ""
    task_id: str | None = None

    @classmethod
    def from_redis(cls, raw: dict[str, Any]) -> JobRecord:
        values = {name: value for name, value in raw.items() if name in RECORD_FIELDS}
        values["state"] = JobState(values.get("state", JobState.QUEUED))
        return cls(**values)


RECORD_FIELDS = [f.name for f in fields(JobRecord)]


@dataclass(frozen=True)
class RunStatus:
    """A snapshot of a run: its metadata and every job's record."""

    run_id: str
    state: RunState
    output_dir: str
    created_at: float
    jobs: list[JobRecord]

    @property
    def counts(self) -> Counter[JobState]:
        return Counter(job.state for job in self.jobs)

    @property
    def total(self) -> int:
        return len(self.jobs)

    @property
    def done(self) -> int:
        return sum(1 for job in self.jobs if job.state.is_final)

    @property
    def finished(self) -> bool:
        return all(job.state.is_final for job in self.jobs)

    @property
    def all_succeeded(self) -> bool:
        return all(job.state.is_success for job in self.jobs)

    def by_node(self) -> dict[str, list[JobRecord]]:
        nodes: dict[str, list[JobRecord]] = defaultdict(list)
        for job in self.jobs:
            nodes[job.node].append(job)
        return dict(sorted(nodes.items()))

    def counts_text(self) -> str:
        """``11 succeeded, 1 failed, 4 running``: the non-zero states."""
        counts = self.counts
        return ", ".join(f"{counts[state]} {state}" for state in JobState if counts[state])

    def line(self) -> str:
        """One line for logs: ``12/36 final: 11 succeeded, 1 failed, 4 running``."""
        return f"{self.done}/{self.total} final: {self.counts_text()}"


def read_info(client: redis.Redis, run_id: str) -> dict[str, Any]:
    """The run's metadata as recorded at submit time; ``RunNotFoundError`` if none."""
    raw = client.hgetall(run_key(run_id))
    if not raw:
        raise RunNotFoundError(f"run {run_id!r} not found in Redis (expired, or wrong id)")
    return decode(raw)


def read_status(client: redis.Redis, run_id: str) -> RunStatus:
    """A snapshot of every job's state (the record's fields only, not the stored message)."""
    info = read_info(client, run_id)
    job_ids = [raw.decode() for raw in client.lrange(jobs_key(run_id), 0, -1)]
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(job_key(run_id, job_id), RECORD_FIELDS)
    records = [
        JobRecord.from_redis(decode({name: value for name, value in zip(RECORD_FIELDS, row,
                                                                        strict=True)
                                     if value is not None}))
        for row in pipe.execute() if any(value is not None for value in row)
    ]
    return RunStatus(run_id=run_id, state=RunState(info["state"]),
                     output_dir=info["output_dir"], created_at=info["created_at"], jobs=records)


def read_spec(client: redis.Redis, run_id: str, job_id: str) -> dict[str, Any]:
    """The message a job was published with (for retries)."""
    return decode(client.hgetall(job_key(run_id, job_id)))["spec"]
