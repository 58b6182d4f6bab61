"""Run tracking in Redis: the one place that knows the key layout.

Both sides write here: the head node creates the run and its jobs (state
``queued``); the worker moves a job to ``running`` and then to a final state.
Every job is its own hash so that each side updates single fields atomically.

Keys (``<p>`` is the prefix, ``sc`` by default):
    <p>:runs                     sorted set of run ids by creation time
    <p>:run:<run_id>             hash: run metadata (JSON values)
    <p>:run:<run_id>:jobs        list of job ids, in jobs-file order
    <p>:run:<run_id>:job:<id>    hash: one job's record (JSON values)
"""

from __future__ import annotations

import json
import os
import time
from enum import StrEnum
from typing import Any

import redis

KEY_PREFIX = os.environ.get("SC_KEY_PREFIX", "sc")
# Runs and their jobs are kept this long after the last write (seconds).
RUN_TTL_S = int(os.environ.get("SC_RUN_TTL", str(7 * 24 * 3600)))


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # its .done already existed: nothing to do
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)

    @property
    def is_success(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.SKIPPED)


class RunState(StrEnum):
    PUBLISHING = "publishing"
    ACTIVE = "active"
    CANCELLED = "cancelled"


def runs_key() -> str:
    return f"{KEY_PREFIX}:runs"


def run_key(run_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}"


def jobs_key(run_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}:jobs"


def job_key(run_id: str, job_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}:job:{job_id}"


def encode(fields: dict[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in fields.items()}


def decode(raw: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = name.decode() if isinstance(name, bytes) else name
        out[key] = json.loads(value)
    return out


class JobTracker:
    """The worker's view: update one job of one run.

    Parameters:
        client: a redis-py client on the tracking Redis.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def run_cancelled(self, run_id: str) -> bool:
        state = self.client.hget(run_key(run_id), "state")
        return state is not None and json.loads(state) == RunState.CANCELLED

    def update(self, run_id: str, job_id: str, **fields: Any) -> None:
        key = job_key(run_id, job_id)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping=encode(fields))
        pipe.expire(key, RUN_TTL_S)
        pipe.execute()

    def mark_skipped(self, run_id: str, job_id: str, **fields: Any) -> None:
        """Skipped for its marker, unless this run already recorded it succeeded.

        A message delivered twice (a job longer than the visibility timeout) finds the
        marker its first delivery wrote: the job stays ``succeeded``.
        """
        state = self.client.hget(job_key(run_id, job_id), "state")
        if state is not None and json.loads(state) == JobState.SUCCEEDED:
            return
        self.update(run_id, job_id, state=JobState.SKIPPED, **fields)

    def start_attempt(self, run_id: str, job_id: str, **fields: Any) -> int:
        """Mark the job running and count the attempt; returns the attempt number."""
        key = job_key(run_id, job_id)
        pipe = self.client.pipeline()
        pipe.hincrby(key, "attempts", 1)
        pipe.hset(key, mapping=encode({"state": JobState.RUNNING, **fields}))
        pipe.expire(key, RUN_TTL_S)
        attempts, *_ = pipe.execute()
        return int(attempts)


def now() -> float:
    return round(time.time(), 3)
