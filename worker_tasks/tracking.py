"""Run tracking in Redis: the one place that knows the key layout.

Both sides write here: the head node creates the run and its jobs (state
``queued``); the worker moves a job to ``running`` and then to a final state.
Every change of state is one Lua transition that checks where the job is
(and, for a worker, that its message is still the job's current one), so two
writers never race: a cancelled job cannot become ``succeeded``, a stale
message (the job was moved or retried since) cannot touch the record. Each
transition also keeps the run's per-state counters and appends to the run's
change stream, so followers read what changed instead of every record.

Keys (``<p>`` is the prefix, ``sc`` by default):
    <p>:runs                      sorted set of run ids by creation time
    <p>:run:<run_id>              hash: run metadata (JSON values)
    <p>:run:<run_id>:jobs         list of job ids, in jobs-file order
    <p>:run:<run_id>:job:<id>     hash: one job's record: ``spec`` (its message, JSON, stored
                                  once), ``node``, and its state fields (JSON values)
    <p>:run:<run_id>:counts       hash: state -> number of jobs in it
    <p>:run:<run_id>:events       stream: one entry per transition (job, state, extra)
    <p>:lease:node:<node>         the node's lease while one of its jobs runs (lease.py)
    <p>:busy                      hash: node -> seconds its jobs have run (metrics)
    <p>:workers:<node>            the workers serving a node (presence.py)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
import redis

KEY_PREFIX = os.environ.get("SC_KEY_PREFIX", "sc")
# Runs and their jobs are kept this long after the last write (seconds).
RUN_TTL_S = int(os.environ.get("SC_RUN_TTL", str(7 * 24 * 3600)))
# Change-stream entries kept per run beyond its job count (approximate trimming).
EVENTS_SLACK = 10_000


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHING = "finishing"  # succeeded, its .done being written: a cancel comes too late
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # its .done already existed: nothing to do
    CANCELLED = "cancelled"
    LOST = "lost"  # its message is gone and nothing runs it: `retry --lost` republishes it

    @property
    def is_final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING, JobState.FINISHING)

    @property
    def is_success(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.SKIPPED)


class RunState(StrEnum):
    PUBLISHING = "publishing"
    ACTIVE = "active"
    CANCELLED = "cancelled"


# The message fields a record keeps in its one ``spec`` field (JSON): the job as planned,
# stored once. ``node`` is also a field of its own (a move changes it).
SPEC_FIELDS = ("job_id", "script", "args", "node", "gpu_id", "output_file", "done_file",
               "log_file", "timeout", "env", "retries", "retry_delay", "per_gpu")


def runs_key() -> str:
    return f"{KEY_PREFIX}:runs"


def run_key(run_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}"


def jobs_key(run_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}:jobs"


def job_key(run_id: str, job_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}:job:{job_id}"


def counts_key(run_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}:counts"


def events_key(run_id: str) -> str:
    return f"{KEY_PREFIX}:run:{run_id}:events"


def lease_key(slot: str) -> str:
    """The lease of a node, or of one GPU of it (``rig-a.gpu1``) in per-GPU mode."""
    return f"{KEY_PREFIX}:lease:node:{slot}"


def busy_key() -> str:
    """Hash: node -> seconds its jobs have run (every attempt, every run): for metrics."""
    return f"{KEY_PREFIX}:busy"


def run_keys(run_id: str) -> list[str]:
    """The run-level keys (metadata, job list, counters, stream), for expiry and deletion."""
    return [run_key(run_id), jobs_key(run_id), counts_key(run_id), events_key(run_id)]


def encode(fields: Mapping[str, Any]) -> dict[str, str]:
    return {name: json.dumps(value) for name, value in fields.items()}


def decode(raw: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """A record's fields, each a JSON value (orjson: reading 100,000 records is 5x faster)."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = name.decode() if isinstance(name, bytes) else name
        out[key] = orjson.loads(value)
    return out


# One state change of one job, atomically (see the module docstring).
# KEYS: job, counts, events, run.
# ARGV: 1 new state (JSON), 2 allowed current states (JSON, space-separated), 3 the task id
#       the record must hold (JSON) or '', 4 TTL, 5 '1' to count an attempt, 6 '1' to refuse
#       when the run is cancelled, 7 stream entries kept beyond 4 per job, 8 job id,
#       9 event extra (JSON), 10.. field/value pairs (JSON values).
# Returns {outcome, previous state (JSON or ''), attempts}; outcome is ok, missing,
# cancelled, superseded or refused.
TRANSITION_LUA = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {'missing', '', 0} end
if ARGV[6] == '1' then
  local run_state = redis.call('HGET', KEYS[4], 'state')
  if run_state == '"cancelled"' then return {'cancelled', current, 0} end
end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'task_id') ~= ARGV[3] then
  return {'superseded', current, 0}
end
local allowed = false
for state in string.gmatch(ARGV[2], '%S+') do
  if state == current then allowed = true end
end
if not allowed then return {'refused', current, 0} end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if ARGV[5] == '1' then attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if current ~= ARGV[1] then
  redis.call('HINCRBY', KEYS[2], cjson.decode(current), -1)
  redis.call('HINCRBY', KEYS[2], cjson.decode(ARGV[1]), 1)
end
local keep = tonumber(redis.call('HGET', KEYS[4], 'jobs_total') or '0') * 4 + tonumber(ARGV[7])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', keep, '*', 'job', ARGV[8], 'state', ARGV[1],
           'extra', ARGV[9])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return {'ok', current, attempts}
"""


# Queued records of many jobs in one call: the server does the per-key work.
# ARGV: 1 job key prefix, 2 TTL, 3 queued_at (JSON), then per job: id, spec (JSON),
#       node (JSON), task id (JSON).
CREATE_LUA = """
for i = 4, #ARGV, 4 do
  local key = ARGV[1] .. ARGV[i]
  redis.call('HSET', key, 'spec', ARGV[i + 1], 'node', ARGV[i + 2], 'state', '"queued"',
             'attempts', '0', 'queued_at', ARGV[3], 'task_id', ARGV[i + 3])
  redis.call('EXPIRE', key, ARGV[2])
end
return (#ARGV - 3) / 4
"""


@dataclass(frozen=True)
class Transition:
    """What a transition did: ``ok``, or why not (missing, cancelled, superseded, refused)."""

    outcome: str
    previous: JobState | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def states_arg(states: Iterable[JobState]) -> str:
    return " ".join(json.dumps(str(state)) for state in states)


class JobTracker:
    """Transitions of jobs' records, for the worker and the head node alike.

    Parameters:
        client: a redis-py client on the tracking Redis.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._transition = client.register_script(TRANSITION_LUA)

    def run_cancelled(self, run_id: str) -> bool:
        state = self.client.hget(run_key(run_id), "state")
        return state is not None and json.loads(state) == RunState.CANCELLED

    def transition(
        self,
        run_id: str,
        job_id: str,
        state: JobState,
        allowed: Iterable[JobState],
        holding: str | None = None,
        count_attempt: bool = False,
        unless_cancelled: bool = False,
        event: Mapping[str, Any] | None = None,
        client: Any = None,
        **fields: Any,
    ) -> Transition | None:
        """Move a job to ``state`` if it is in one of ``allowed`` (and holds task id ``holding``).

        ``fields`` are set with the state (``task_id`` among them, to supersede the job's
        message). With ``client`` a pipeline, the call is queued and None is returned.
        """
        pairs: list[str] = []
        for name, value in encode(fields).items():
            pairs += [name, value]
        args = [json.dumps(str(state)), states_arg(allowed),
                json.dumps(holding) if holding else "", RUN_TTL_S,
                "1" if count_attempt else "0", "1" if unless_cancelled else "0",
                EVENTS_SLACK, job_id, json.dumps(dict(event or {})), *pairs]
        keys = [job_key(run_id, job_id), counts_key(run_id), events_key(run_id), run_key(run_id)]
        result = self._transition(keys=keys, args=args, client=client)
        if client is not None:
            return None
        return parse_transition(result)

    def add_busy(self, node: str, seconds: float) -> None:
        self.client.hincrbyfloat(busy_key(), node, seconds)

    def update(self, run_id: str, job_id: str, **fields: Any) -> None:
        """Set fields of a record without changing its state (bookkeeping only)."""
        key = job_key(run_id, job_id)
        pipe = self.client.pipeline()
        pipe.hset(key, mapping=encode(fields))
        pipe.expire(key, RUN_TTL_S)
        pipe.execute()

    def record(self, run_id: str, job_id: str, *names: str) -> dict[str, Any]:
        """Some fields of a job's record (all when none are named); {} if there is none."""
        key = job_key(run_id, job_id)
        if not names:
            return decode(self.client.hgetall(key))
        values = self.client.hmget(key, list(names))
        return {name: json.loads(value) for name, value in zip(names, values, strict=True)
                if value is not None}


def parse_transition(result: list[Any]) -> Transition:
    outcome, previous, attempts = result
    outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
    previous = previous.decode() if isinstance(previous, bytes) else previous
    return Transition(outcome=outcome,
                      previous=JobState(json.loads(previous)) if previous else None,
                      attempts=int(attempts))


def now() -> float:
    return round(time.time(), 3)
