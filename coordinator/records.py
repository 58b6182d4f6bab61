"""What the tracking records say about a run: typed snapshots read from Redis.

``read_status`` is the one reader of a run's records; the run handle, the
collector, the progress display and the CLI all work from its ``RunStatus``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import redis

from coordinator.errors import RunNotFoundError
from worker_tasks.kinds import checks_of, fits, of_kind
from worker_tasks.spec import by_node
from worker_tasks.tracking import (
    RETRYABLE,
    CopyState,
    JobState,
    RunState,
    counts_key,
    counts_of,
    decode,
    entry_of,
    error_lines,
    job_key,
    jobs_key,
    run_key,
    runs_key,
    state_of,
)


@dataclass(frozen=True)
class JobRecord:
    """One job's tracked state."""

    job_id: str
    node: str
    state: JobState
    gpu_id: int = 0
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
    history: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0
    retry_at: float | None = None
    moved_from: str | None = None
    pin: bool = False
    floating: bool = False  # its message names no node: the first free slot takes it
    per_gpu: bool = False
    workdir: str | None = None  # the worker's directory, where it wrote the job's files
    after: list[str] = field(default_factory=list)  # the jobs it waits for
    cost: float | None = None  # its cost hint (1 without one)
    speculate: bool | None = None  # False: never copied (None: as its run says)
    copy: dict[str, Any] | None = None  # its backup copy (worker_tasks.tracking.CopyState)

    def error_lines(self) -> tuple[str, list[str]]:
        """The error's first line, and the script's own last words under it."""
        return error_lines(self.error)

    @classmethod
    def from_redis(cls, raw: dict[str, Any]) -> JobRecord:
        """The record as ``decode`` read it. A field of another kind than this class declares
        (a record edited by hand) is read as no field; a state that is none of this
        version's makes the job lost, its error saying so (no worker moves such a record)."""
        checks = checks_of(cls)
        spec = raw.get("spec")
        values = {name: spec[name] for name in SPEC_VALUES if name in spec
                  and checks[name](spec[name])} if isinstance(spec, dict) else {}
        values.update((name, value) for name, value in raw.items()
                      if name in OWN_FIELDS and checks[name](value))
        values.setdefault("node", "")  # neither the record nor its message names one
        written = raw.get("state", JobState.QUEUED)
        state = values["state"] = state_of(written) or JobState.LOST
        if state is JobState.LOST and written != JobState.LOST:
            values["error"] = (f"its record's state {json.dumps(written)} is none this "
                               f"version knows (edited by hand, or written by a newer one)")
        if values.get("copy") is not None and not fits(values["copy"].get("state"), CopyState):
            del values["copy"]  # a copy with no state of its own: as if none was recorded
        if values.get("history"):
            values["history"] = [entry_of(entry) for entry in values["history"]]
        values["job_id"] = raw["job_id"]
        return cls(**values)


# What a record's ``spec`` (the job's message) contributes to a JobRecord.
SPEC_VALUES = ("job_id", "node", "gpu_id", "script", "args", "output_file", "done_file",
               "log_file", "retries", "per_gpu", "after", "cost", "speculate")
# The record's own fields (``spec`` is read as one JSON value and unpacked).
RECORD_FIELDS = [f.name for f in fields(JobRecord) if f.name not in SPEC_VALUES
                 or f.name == "node"] + ["spec"]
# The record's own fields a reader takes as they are (of their kind): all but its message,
# its state (read apart: one that is none of ours makes the job lost) and its name.
OWN_FIELDS = frozenset(RECORD_FIELDS) - {"spec", "state", "job_id"}
# What following a run needs of each job (not its message: cheap for 100,000 jobs).
FOLLOW_FIELDS = ["node", "state", "attempts", "duration_s", "started_at", "finished_at",
                 "host", "error", "task_id", "pin", "exit_code", "moved_from", "floating",
                 "workdir", "copy"]


@dataclass(frozen=True)
class RunStatus:
    """A snapshot of a run: its metadata and every job's record.

    ``state`` is the run record's own lifecycle, as the head node sets it
    (``publishing``, ``active``, ``cancelled``); nothing rewrites the run record
    when its last job ends (each job's end is that job's own transition), so a
    finished run stays ``active`` there. What the run came to is ``outcome``:
    ``active`` until every job is final, then ``finished``, ``failed`` or
    ``cancelled``.
    """

    run_id: str
    state: RunState
    output_dir: str
    created_at: float
    jobs: list[JobRecord]
    info: dict[str, Any] = field(default_factory=dict)

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

    @property
    def troubled(self) -> bool:
        """A job failed, was cancelled or is lost (whatever else still runs)."""
        return any(job.state in RETRYABLE for job in self.jobs)

    @property
    def outcome(self) -> str:
        """``active`` (or ``publishing``) until every job is final; then ``finished`` when all
        succeeded, ``cancelled`` for a cancelled run, else ``failed``."""
        if not self.finished:
            return str(self.state)
        if self.all_succeeded:
            return "finished"
        return "cancelled" if self.state is RunState.CANCELLED else "failed"

    @property
    def submitted_dir(self) -> Path:
        """The directory the run was submitted with (``--workdir``, absolute), else here."""
        return Path(self.info.get("workdir") or ".")

    def files_dir(self) -> Path:
        """Where this machine sees the run's files: the one directory its workers wrote into,
        when it exists here (a shared volume mounted at the same path); else the directory
        the run was submitted with."""
        used = {job.workdir for job in self.jobs if job.workdir}
        if len(used) == 1:
            only = Path(used.pop())
            if only.is_dir():
                return only
        return self.submitted_dir

    def by_node(self) -> dict[str, list[JobRecord]]:
        return by_node(self.jobs)

    def counts_text(self) -> str:
        """``11 succeeded, 1 failed, 4 running``: the non-zero states."""
        counts = self.counts
        return ", ".join(f"{counts[state]} {state}" for state in JobState if counts[state])

    def line(self) -> str:
        """One line for logs: ``12/36 final: 11 succeeded, 1 failed, 4 running``."""
        return f"{self.done}/{self.total} final: {self.counts_text()}"

    def hold_text(self) -> str | None:
        """What a run held by ``--after`` waits for, or why it ended without starting; None
        for a run that waits for no run (or no longer does)."""
        if self.info.get("ended_because"):
            return f"ended without starting: {self.info['ended_because']}"
        after = self.info.get("after_runs") or {}
        if not after or self.info.get("runs_released"):
            return None
        return "waits for " + ", ".join(f"run {run} ({mode})" for run, mode in after.items())


def read_info(client: redis.Redis, run_id: str) -> dict[str, Any]:
    """The run's metadata as recorded at submit time; ``RunNotFoundError`` if none."""
    raw = client.hgetall(run_key(run_id))
    if not raw:
        raise RunNotFoundError(f"run {run_id!r} not found in Redis (expired, or wrong id)")
    return decode(raw)


@dataclass(frozen=True)
class RunInfo:
    """A run's metadata as recorded at submit time, read once (``Run.info``).

    The fields every caller reads are typed attributes; ``info["name"]`` and
    ``info.get("name")`` reach any other recorded field.
    """

    fields: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    @property
    def planned(self) -> dict[str, int]:
        """Jobs per node, as submitted."""
        return dict(self.fields.get("jobs_per_node") or {})

    @property
    def slots(self) -> list[str]:
        """Where the run's jobs run one at a time: nodes, or nodes' GPUs (per-GPU runs)."""
        return list(self.fields.get("slots") or [])

    @property
    def jobs_per_slot(self) -> dict[str, int]:
        return dict(self.fields.get("jobs_per_slot") or self.planned)

    @property
    def recovered(self) -> int:
        """Jobs a recovered run found done (their ``.done`` exists) and did not publish."""
        return int(self.fields.get("recovered_jobs") or 0)

    @property
    def pushed(self) -> list[str]:
        """Lines about input files pushed to nodes before publishing (node-local storage)."""
        return list(self.fields.get("pushed") or [])

    @property
    def publish_notes(self) -> list[str]:
        """What happened while publishing that a user should know (a broker failover)."""
        return list(self.fields.get("publish_notes") or [])

    @property
    def signed(self) -> bool:
        """Whether its jobs were published signed with the head's key."""
        return bool(self.fields.get("signed"))


# Records read per pipeline round trip.
READ_CHUNK = 5000


def read_records(client: redis.Redis, run_id: str, job_ids: list[str],
                 names: list[str] = RECORD_FIELDS) -> list[JobRecord]:
    """The named fields of each job's record, pipelined in chunks; missing records left out."""
    wanted = set(names)
    everything = wanted >= set(RECORD_FIELDS)
    records: list[JobRecord] = []
    for start in range(0, len(job_ids), READ_CHUNK):
        part = job_ids[start:start + READ_CHUNK]
        pipe = client.pipeline(transaction=False)
        for job_id in part:
            if everything:  # one short command per job: cheaper to send and parse than HMGET
                pipe.hgetall(job_key(run_id, job_id))
            else:
                pipe.hmget(job_key(run_id, job_id), names)
        for job_id, reply in zip(part, pipe.execute(), strict=True):
            raw = (reply if everything else
                   {name: value for name, value in zip(names, reply, strict=True)
                    if value is not None})
            if raw:
                records.append(JobRecord.from_redis({"job_id": job_id, **decode(raw)}))
    return records


def read_status(client: redis.Redis, run_id: str,
                names: list[str] = RECORD_FIELDS) -> RunStatus:
    """A snapshot of every job's record (``names``: which fields; all by default)."""
    info = read_info(client, run_id)
    job_ids = [raw.decode() for raw in client.lrange(jobs_key(run_id), 0, -1)]
    return status_from(run_id, info, read_records(client, run_id, job_ids, names))


def status_from(run_id: str, info: dict[str, Any], jobs: list[JobRecord]) -> RunStatus:
    """The run's snapshot. Fields of its record of another kind than ``RunStatus`` declares
    (edited by hand) are read as none: a state this version does not know as ``active``
    (its jobs' states say how it ends), no output directory, no creation time."""
    known = of_kind(RunStatus, info)
    return RunStatus(run_id=run_id, state=RunState(known.get("state", RunState.ACTIVE)),
                     output_dir=known.get("output_dir", ""),
                     created_at=known.get("created_at", 0.0), jobs=jobs, info=info)


def read_counts(client: redis.Redis, run_id: str) -> Counter[JobState]:
    """Jobs per state, as the transitions counted them (one small read)."""
    return counts_of(client.hgetall(counts_key(run_id)))


def latest_run_id(client: redis.Redis) -> str | None:
    newest = recent_run_ids(client, 1)
    return newest[0] if newest else None


# How many of the newest runs a re-started submission looks through for its own.
RESUME_LOOKBACK = 50


def unfinished_run_of(client: redis.Redis, digest: str, workdir: str) -> str | None:
    """The newest run recorded with this plan digest and workdir that is still under way
    (published, not cancelled, some job not final): the run a re-started submission of
    the same jobs should follow instead of publishing them again."""
    for run_id in recent_run_ids(client, RESUME_LOOKBACK):
        raw = client.hmget(run_key(run_id), ["plan_digest", "workdir", "state"])
        info = decode({name: value for name, value in
                       zip(("plan_digest", "workdir", "state"), raw, strict=True)
                       if value is not None})
        if (info.get("plan_digest") == digest and info.get("workdir") == workdir
                and info.get("state") == RunState.ACTIVE
                and any(not state.is_final for state in read_counts(client, run_id))):
            return run_id
    return None


def recent_run_ids(client: redis.Redis, limit: int) -> list[str]:
    """The newest ``limit`` run ids, newest first."""
    return [raw.decode() for raw in client.zrevrange(runs_key(), 0, limit - 1)]
