"""The run handle: what other pipeline steps hold after ``submit``.

    run = submit("scoring_jobs.json")
    run.status()            # a RunStatus snapshot, from Redis
    run.wait(timeout=600)   # blocks until every job is final
    run.summary()           # collects: writes run_summary.json, returns it
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import redis

from coordinator.errors import RunNotFoundError, WaitTimeoutError
from worker_tasks.tracking import JobState, RunState, decode, job_key, jobs_key, run_key

# How often wait() reads the run's state from Redis (seconds).
POLL_INTERVAL_S = 0.5


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


class Run:
    """A handle on a submitted run; every method reads Redis, so any process may hold one.

    Parameters:
        run_id: the id printed by ``submit``.
        client: a redis-py client on the tracking Redis.
        broker_url: the broker, for retrying or cancelling jobs.
    """

    def __init__(self, run_id: str, client: redis.Redis, broker_url: str | None = None) -> None:
        self.id = run_id
        self.client = client
        self.broker_url = broker_url

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    def info(self) -> dict[str, Any]:
        """The run's metadata as recorded at submit time."""
        raw = self.client.hgetall(run_key(self.id))
        if not raw:
            raise RunNotFoundError(f"run {self.id!r} not found in Redis (expired, or wrong id)")
        return decode(raw)

    def status(self) -> RunStatus:
        """A snapshot of every job's state."""
        info = self.info()
        job_ids = [raw.decode() for raw in self.client.lrange(jobs_key(self.id), 0, -1)]
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:  # the record's fields only, not the stored message
            pipe.hmget(job_key(self.id, job_id), RECORD_FIELDS)
        records = [
            JobRecord.from_redis(decode({name: value for name, value in zip(RECORD_FIELDS, row,
                                                                            strict=True)
                                         if value is not None}))
            for row in pipe.execute() if any(value is not None for value in row)
        ]
        return RunStatus(
            run_id=self.id,
            state=RunState(info["state"]),
            output_dir=info["output_dir"],
            created_at=info["created_at"],
            jobs=records,
        )

    def wait(
        self,
        timeout: float | None = None,
        on_progress: Callable[[RunStatus], None] | None = None,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> RunStatus:
        """Block until every job is final; ``on_progress`` gets each changed snapshot.

        Raises ``WaitTimeoutError`` when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: list[tuple[str, str, int]] | None = None
        while True:
            status = self.status()
            shape = [(job.job_id, job.state.value, job.attempts) for job in status.jobs]
            if on_progress is not None and shape != last:
                on_progress(status)
            last = shape
            if status.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"run {self.id}: not finished after {timeout:g} s ({status.line()})"
                )
            time.sleep(poll_interval)

    def summary(self, workdir: str = ".") -> dict[str, Any]:
        """Collect the run: write ``<output-dir>/run_summary.json`` and return it."""
        from coordinator.collector import collect

        return collect(self, workdir=workdir).summary

    def cancel(self) -> int:
        """Stop the run: queued jobs are dropped, running ones terminated. Returns how many."""
        from coordinator.submit import cancel_run

        return cancel_run(self)

    def retry_failed(self) -> int:
        """Publish the failed and cancelled jobs again. Returns how many."""
        from coordinator.submit import retry_failed

        return retry_failed(self)

    def spec_message(self, job_id: str) -> dict[str, Any]:
        """The message the job was published with (for retries)."""
        return decode(self.client.hgetall(job_key(self.id, job_id)))["spec"]
