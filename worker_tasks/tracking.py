"""Run tracking in Redis: the one place that knows the key layout.

Both sides write here: the head node creates the run and its jobs (state
``queued``); the worker moves a job to ``running`` and then to a final state.
Every change of state is one Lua transition that checks where the job is
(and, for a worker, that its message is still the job's current one), so two
writers never race: a cancelled job cannot become ``succeeded``, a stale
message (the job was moved or retried since) cannot touch the record. Each
transition also keeps the run's per-state counters and appends to the run's
change stream, so followers read what changed instead of every record.

The job state machine. Each transition is one named ``JobTracker`` method that
owns the states it may start from; every other start state is refused (the
record is left as it is). ``holding``: the record must still name the caller's
message (task id), so a stale message cannot touch it.

    method           from                                 to          by      holding
    create_jobs      (none)                               queued      head    -
                                                          held (a job with "after")
    hold             queued                               held        head    -    (retry)
    release          held                                 queued      either  -    (every job
                                                                                   it waits for
                                                                                   succeeded)
    end_held         held                                 cancelled   either  -    (one failed
                                                                                   for good)
    halt             queued held lost (now: + running)    cancelled   worker  -    (--halt)
    start            queued running finishing lost        running     worker  yes  (+1 attempt,
                                                                                   refused once
                                                                                   the run is
                                                                                   cancelled)
    wait_to_retry    queued running finishing lost        running     worker  yes
    finish           queued running finishing lost        finishing   worker  yes
    succeed          finishing                            succeeded   worker  yes
    fail             queued running finishing lost        failed      worker  yes
    skip             queued running finishing lost failed skipped     worker  yes
    drop_cancelled   queued running finishing lost        cancelled   worker  yes
    cancel           queued running lost held             cancelled   head    -
    settle_done      running finishing                    succeeded   head    yes
    requeue_dead     running finishing                    queued      head    yes
    mark_lost        queued running finishing             lost        head    yes
    republish        one of RETRYABLE / MOVABLE / LOST    queued      head    yes  (new task id)

A backup copy (``speculation``) runs beside the job's own message, under a task id of its
own kept in the record's ``copy`` field (``CopyState``); it never changes the job's state
until it claims the job's success:

    add_copy         running, no copy ever                (copy queued)       head    yes
    start_copy       queued running lost                  (copy running)      worker  copy
    claim_copy       queued running lost                  finishing   worker  copy (the copy's
                                                                              task id becomes
                                                                              the job's)
    end_copy         queued running lost                  (copy failed)       worker  copy
    hand_over        queued running lost, copy running    running     worker  yes  (it failed
                                                                              for good: the
                                                                              copy runs on)

Whichever execution claims first wins (``finish`` or ``claim_copy``, each one Lua step); the
other is superseded, and the step that supersedes it writes its entry in the job's history,
so a loser whose node died is accounted for too.

Keys (``<p>`` is the prefix, ``sc`` by default):
    <p>:runs                      sorted set of run ids by creation time
    <p>:run:<run_id>              hash: run metadata (JSON values)
    <p>:run:<run_id>:jobs         list of job ids, in jobs-file order
    <p>:run:<run_id>:job:<id>     hash: one job's record: ``spec`` (its message, JSON, stored
                                  once), ``node``, and its state fields (JSON values)
    <p>:run:<run_id>:counts       hash: state -> number of jobs in it
    <p>:run:<run_id>:events       stream: one entry per transition (job, state, extra)
    <p>:lease:node:<slot>         the slot's lease while one of its jobs runs (lease.py; the
                                  key says "node" for workers of earlier versions)
    <p>:busy                      hash: node -> seconds its jobs have run (metrics)
    <p>:held:<run_id>:<job_id>    (on the broker) the signed message of a held job, until its
                                  release moves it into its queue (dependencies.py)
    <p>:workers:<node>            the workers serving a node (presence.py)
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
import redis

from worker_tasks.kinds import check_for, of_kind

KEY_PREFIX = os.environ.get("SC_KEY_PREFIX", "sc")
# Runs and their jobs are kept this long after the last write (seconds).
RUN_TTL_S = int(os.environ.get("SC_RUN_TTL", str(7 * 24 * 3600)))
# A "P%" timeout has a median once this many jobs of its script have succeeded.
MEDIAN_MIN_JOBS = 3
# Change-stream entries kept per run beyond its job count (approximate trimming).
EVENTS_SLACK = 10_000


class JobState(StrEnum):
    HELD = "held"  # waits for the jobs it names in "after" (dependencies.py releases it)
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
        return self not in (JobState.HELD, JobState.QUEUED, JobState.RUNNING,
                            JobState.FINISHING)

    @property
    def is_success(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.SKIPPED)


class CopyState(StrEnum):
    """Where a job's backup copy stands (the record's ``copy`` field)."""

    QUEUED = "queued"  # published to an idle slot, not started
    RUNNING = "running"
    WON = "won"  # it claimed the job's success: its task id is the job's now
    FAILED = "failed"  # its one attempt failed; the job's own execution runs on
    TOOK_OVER = "took over"  # the job's own execution failed for good; the copy runs on as it
    SUPERSEDED = "superseded"  # the job ended another way first (it succeeded, was cancelled)

    @property
    def is_live(self) -> bool:
        return self in (CopyState.QUEUED, CopyState.RUNNING)


class RunState(StrEnum):
    PUBLISHING = "publishing"
    ACTIVE = "active"
    CANCELLED = "cancelled"


# States an attempt may start (and finish) from, holding its current message: queued,
# running (a dead attempt's record, or this one's), finishing, or lost; the head node may
# have set either while the attempt ran, taking its worker for dead.
STARTABLE = (JobState.QUEUED, JobState.RUNNING, JobState.FINISHING, JobState.LOST)
# States of a job an attempt is working on (its worker holds the node's lease meanwhile).
ACTIVE = (JobState.RUNNING, JobState.FINISHING)
# What a head-node cancel stops: jobs not final, and not past the point of a cancel.
CANCELLABLE = (JobState.QUEUED, JobState.RUNNING, JobState.LOST, JobState.HELD)
# What ``retry`` publishes again, what a ``move`` relocates, what a lost job is.
RETRYABLE = (JobState.FAILED, JobState.CANCELLED, JobState.LOST)
MOVABLE = (JobState.QUEUED, JobState.LOST, JobState.RUNNING)
# What a halt ends (a ``now`` halt: running jobs too).
HALTABLE = (JobState.QUEUED, JobState.HELD, JobState.LOST)
LOST_ONLY = (JobState.LOST,)


# In a recorded error: the line between what went wrong and the script's last output lines.
OUTPUT_TAIL_HEADER = "last lines of its output:"


def error_lines(error: str | None, last: int = 2) -> tuple[str, list[str]]:
    """A recorded error's first line, and the last ``last`` lines of the script's output in
    it (its own reason, usually: ``ValueError: chunk 7 has no seeds``)."""
    head, _, tail = (error or "").partition(f"\n{OUTPUT_TAIL_HEADER}\n")
    lines = [line for line in tail.splitlines() if line.strip()]
    return (head.splitlines() or [""])[0], lines[-last:] if last > 0 else []


def error_line(error: str | None) -> str:
    """A recorded error in one line: ``script exited with status 3: ValueError: ...``."""
    head, last = error_lines(error, last=1)
    return ": ".join([head, *last])


@dataclass(frozen=True)
class JobEvent:
    """One entry of a run's change stream: a job's new state and what came with it.

    Written by every transition (beside the Lua, ``TRANSITION_LUA`` adds it), read by
    followers (``coordinator.follow``). Fields left None are not written.
    """

    job: str
    state: JobState
    attempts: int | None = None
    host: str | None = None
    duration_s: float | None = None
    error: str | None = None
    task_id: str | None = None
    node: str | None = None
    note: str | None = None

    # The error in one line (its first, and the script's last output line), cut to this
    # length, travels in the stream.
    ERROR_CHARS = 300

    def extra(self) -> str:
        """The JSON the stream entry carries besides job and state."""
        fields = {name: getattr(self, name) for name in EVENT_FIELDS
                  if getattr(self, name) is not None}
        if self.error is not None:
            fields["error"] = error_line(self.error)[:self.ERROR_CHARS] or None
        return json.dumps(fields)

    @classmethod
    def from_stream(cls, fields: Mapping[bytes, bytes]) -> JobEvent | None:
        """The entry's event; None for one that names no job or no state of this version (a
        hand-made entry). Its other fields of the wrong kind are read as not written."""
        raw = decode(fields)
        extra = raw.get("extra")
        state = state_of(raw.get("state"))
        job = fields.get(b"job", b"").decode(errors="replace")
        if state is None or not job:
            return None
        known = of_kind(cls, extra) if isinstance(extra, dict) else {}
        return cls(job=job, state=state, **{name: known.get(name) for name in EVENT_FIELDS})


EVENT_FIELDS = ("attempts", "host", "duration_s", "error", "task_id", "node", "note")


# The message fields a record keeps in its one ``spec`` field (JSON): the job as planned,
# stored once. ``node`` is also a field of its own (a move changes it).
SPEC_FIELDS = ("job_id", "script", "args", "node", "gpu_id", "output_file", "done_file",
               "log_file", "timeout", "env", "retries", "retry_delay", "per_gpu", "after",
               "cost", "warm", "speculate")


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
    """A record's fields, each a JSON value (orjson: reading 100,000 records is 5x faster);
    a field that is not JSON (a hand-made edit: we write none) is read as no field."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        key = name.decode() if isinstance(name, bytes) else name
        try:
            out[key] = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
    return out


def value_of(raw: bytes | str | None) -> Any:
    """One field's JSON value, read as ``decode`` reads it; None when absent or not JSON."""
    return decode({"": raw}).get("") if raw is not None else None


def state_of(value: Any) -> JobState | None:
    """The job state ``value`` names; None if it names none (a record edited by hand, or
    written by a newer version)."""
    return JobState(value) if isinstance(value, str) and value in STATE_NAMES else None


STATE_NAMES = frozenset(state.value for state in JobState)


def counts_of(raw: Mapping[bytes, bytes]) -> Counter[JobState]:
    """A run's counters (``counts_key``) as jobs per state; a name that is no state, or a count
    that is no integer (edits by hand), is left out, as are zeros."""
    counts: Counter[JobState] = Counter()
    for name, value in raw.items():
        state = state_of(name.decode(errors="replace"))
        try:
            count = int(value)
        except ValueError:
            continue
        if state is not None and count:
            counts[state] = count
    return counts


# What each field of a history entry holds (``Attempt.history_entry``, the Lua's
# ``ended_entry`` and the head's dead attempts write them): read with ``entry_of``.
HISTORY_KINDS: dict[str, Any] = {
    "attempt": int | str, "host": str | None, "node": str | None, "gpu": int | None,
    "started_at": float | None, "finished_at": float | None, "elapsed_s": float | None,
    "cpu_s": float | None, "max_rss_mb": float | None, "gpu_mem_mb": float | None,
    "exit_code": int | None, "signal": int | None, "error": str | None, "copy": bool,
    "superseded": bool}


HISTORY_CHECKS = {name: check_for(kind) for name, kind in HISTORY_KINDS.items()}


def entry_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A history entry with each field of another kind than ``HISTORY_KINDS`` says (edited by
    hand) read as none."""
    return {name: value for name, value in entry.items()
            if name not in HISTORY_CHECKS or HISTORY_CHECKS[name](value)}


# Lua shared by the transitions: the server's clock, and appending to a job's history
# (appended, never rewritten: a job's own execution and its copy each add their entries).
LUA_COMMON = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + math.floor(tonumber(t[2]) / 1000) / 1000
end
-- A field's JSON value; nil when absent or not JSON (a record edited by hand).
local function field(key, name)
  local ok, value = pcall(cjson.decode, redis.call('HGET', key, name) or 'null')
  if ok and value ~= cjson.null then return value end
  return nil
end
local function add_history(key, entries)
  if #entries == 0 then return end
  local history = field(key, 'history')
  if type(history) ~= 'table' then history = {} end  -- none, or edited by hand
  for _, entry in ipairs(entries) do table.insert(history, entry) end
  redis.call('HSET', key, 'history', cjson.encode(history))
end
-- The history entry of an execution ended by someone else (a superseded copy, or the job's
-- own execution when its copy won): what the record knows of it.
local function ended_entry(attempt, host, node, started_at, why, copy, died)
  local finished = clock()
  local elapsed, started = cjson.null, cjson.null
  if type(started_at) == 'number' then
    started = started_at
    elapsed = math.floor((finished - started_at) * 1000 + 0.5) / 1000
  end
  return {attempt = attempt, host = host or cjson.null, node = node or cjson.null,
          started_at = started, finished_at = finished, elapsed_s = elapsed,
          exit_code = cjson.null, error = why, copy = copy, superseded = not died}
end
-- The job ended (or its own execution claimed success): a live copy is superseded, its
-- execution, if it started, kept in the history.
local function supersede_copy(key, state)
  local copy = field(key, 'copy')
  if type(copy) ~= 'table' then return end
  if copy.state ~= 'queued' and copy.state ~= 'running' then return end
  if copy.state == 'running' then
    local why = 'superseded: the job became ' .. state .. ' first'
    if state == 'finishing' then why = "superseded: the job's own execution finished first" end
    add_history(key, {ended_entry('copy', copy.host, copy.node, copy.started_at, why, true)})
  end
  copy.state = 'superseded'
  redis.call('HSET', key, 'copy', cjson.encode(copy))
end
"""

# One state change of one job, atomically (see the module docstring).
# KEYS: job, counts, events, run.
# ARGV: 1 new state (JSON), 2 allowed current states (JSON, space-separated), 3 the task id
#       the record must hold (JSON) or '', 4 TTL, 5 '1' to count an attempt, 6 '1' to refuse
#       when the run is cancelled, 7 stream entries kept beyond 4 per job, 8 job id,
#       9 event extra (JSON), 10 the attempt the record must be on or '' (an attempt
#       overtaken by a later one, its worker taken for dead, ends nothing), 11.. field/value
#       pairs (JSON values); the field ``history_add`` (a JSON list) is appended to the
#       history.
# Returns {outcome, previous state (JSON or ''), attempts}; outcome is ok, missing,
# cancelled, superseded or refused.
TRANSITION_LUA = LUA_COMMON + """
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
local on = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '')
if ARGV[10] ~= '' and on and on ~= tonumber(ARGV[10]) then
  return {'superseded', current, 0}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '') or 0
if ARGV[5] == '1' then attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 11, #ARGV, 2 do
  if ARGV[i] == 'history_add' then add_history(KEYS[1], cjson.decode(ARGV[i + 1]))
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local state = cjson.decode(ARGV[1])
if state ~= 'running' and state ~= 'queued' and state ~= 'held' then
  supersede_copy(KEYS[1], state)
end
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


# A backup copy's steps (see the module docstring), atomically.
# KEYS: job, counts, events, run.
# ARGV: 1 step (add, start, claim, end, hand_over), 2 the task id it holds (raw: the copy's;
#       for add and hand_over, the job's own), 3 TTL, 4 job id, 5 stream entries kept beyond
#       4 per job, 6 the step's values (JSON object).
# Returns like TRANSITION_LUA.
COPY_LUA = LUA_COMMON + """
local step, holder, values = ARGV[1], ARGV[2], cjson.decode(ARGV[6])
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return {'missing', '', 0} end
local state = field(KEYS[1], 'state')
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '') or 0
local task_id = field(KEYS[1], 'task_id')
local copy = field(KEYS[1], 'copy')
if type(copy) ~= 'table' then copy = nil end  -- none, or edited by hand
local waiting = state == 'queued' or state == 'running' or state == 'lost'
local function event(new_state, extra)
  local keep = tonumber(redis.call('HGET', KEYS[4], 'jobs_total') or '0') * 4 + tonumber(ARGV[5])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', keep, '*', 'job', ARGV[4],
             'state', cjson.encode(new_state), 'extra', cjson.encode(extra))
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
end
local function become(new_state)
  if new_state ~= state then
    redis.call('HSET', KEYS[1], 'state', cjson.encode(new_state))
    redis.call('HINCRBY', KEYS[2], state, -1)
    redis.call('HINCRBY', KEYS[2], new_state, 1)
  end
end
local function save(copy_now)
  redis.call('HSET', KEYS[1], 'copy', cjson.encode(copy_now))
end
if step == 'add' then
  if task_id ~= holder then return {'superseded', current, attempts} end
  if copy or state ~= 'running' then return {'refused', current, attempts} end
  save({task_id = values.task_id, node = values.node, state = 'queued',
        queued_at = clock()})
  event(state, {note = 'backup copy queued on ' .. values.node})
  return {'ok', current, attempts}
end
if step == 'hand_over' then
  if task_id ~= holder then return {'superseded', current, attempts} end
  if not waiting or not copy or copy.state ~= 'running' then
    return {'refused', current, attempts}
  end
  add_history(KEYS[1], {values.entry})
  redis.call('HSET', KEYS[1], 'task_id', cjson.encode(copy.task_id), 'node',
             cjson.encode(copy.node), 'host', cjson.encode(copy.host), 'started_at',
             cjson.encode(copy.started_at))
  copy.state = 'took over'
  save(copy)
  become('running')
  event('running', {note = 'its own execution failed for good; its backup copy on ' ..
                           copy.node .. ' runs on', task_id = copy.task_id, node = copy.node,
                    host = copy.host})
  return {'ok', current, attempts}
end
local mine = copy and copy.task_id == holder
if step == 'start' then
  if not mine or (copy.state ~= 'queued' and copy.state ~= 'running') then
    return {'superseded', current, attempts}
  end
  if not waiting then return {'refused', current, attempts} end
  if copy.state == 'running' then  -- delivered again: the execution before died with its worker
    add_history(KEYS[1], {ended_entry('copy', copy.host, copy.node, copy.started_at,
                                      'died with its worker; the copy started again', true, true)})
  end
  copy.state, copy.host, copy.started_at = 'running', values.host, values.started_at
  save(copy)
  event(state, {note = 'backup copy started on ' .. copy.node, host = values.host})
  return {'ok', current, attempts}
end
if step == 'end' then
  if not mine or copy.state ~= 'running' then return {'superseded', current, attempts} end
  add_history(KEYS[1], {values.entry})
  copy.state = 'failed'
  save(copy)
  event(state, {note = 'backup copy on ' .. copy.node .. ' failed; the job runs on'})
  return {'ok', current, attempts}
end
if step == 'claim' then
  local took_over = task_id == holder
  if not took_over and not (mine and copy.state == 'running') then
    return {'superseded', current, attempts}
  end
  if not waiting then return {'refused', current, attempts} end
  if not took_over and state == 'running' then
    local why = 'superseded: a backup copy on ' .. copy.node .. ' finished first'
    add_history(KEYS[1], {ended_entry(attempts, field(KEYS[1], 'host'), field(KEYS[1], 'node'),
                                      field(KEYS[1], 'started_at'), why, false)})
  end
  redis.call('HSET', KEYS[1], 'task_id', cjson.encode(holder), 'node', cjson.encode(copy.node),
             'host', cjson.encode(values.host), 'workdir', cjson.encode(values.workdir),
             'started_at', cjson.encode(copy.started_at))
  copy.state = 'won'
  save(copy)
  become('finishing')
  event('finishing', {host = values.host, node = copy.node, task_id = holder,
                      note = 'its backup copy finished first'})
  return {'ok', current, attempts}
end
return redis.error_reply('unknown copy step ' .. step)
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


# Append JSON entries to a run's ``moves`` list in one step (no read-then-write race).
APPEND_MOVES_LUA = """
local ok, moves = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'moves') or '[]')
if not ok or type(moves) ~= 'table' then moves = {} end  -- edited by hand
for _, move in ipairs(cjson.decode(ARGV[1])) do table.insert(moves, move) end
redis.call('HSET', KEYS[1], 'moves', cjson.encode(moves))
return #moves
"""


class TransitionOutcome(StrEnum):
    """What a transition did (``TRANSITION_LUA``'s first reply), or why it did nothing."""

    OK = "ok"
    MISSING = "missing"            # no record: the run expired or was deleted
    CANCELLED = "cancelled"        # the run is cancelled (transitions that refuse then)
    SUPERSEDED = "superseded"      # the record holds another task id (a newer message)
    REFUSED = "refused"            # the record's state is not one the transition leaves


@dataclass(frozen=True)
class Transition:
    """What a transition did: ``ok``, or why not (see ``TransitionOutcome``)."""

    outcome: TransitionOutcome
    previous: JobState | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.outcome is TransitionOutcome.OK


def states_arg(states: Iterable[JobState]) -> str:
    return " ".join(json.dumps(str(state)) for state in states)


class JobTracker:
    """The job state machine (see the module docstring), for the worker and the head node.

    Every method that changes a job's state is one atomic Lua transition; with
    ``client`` a pipeline, the call is queued and returns None.

    Parameters:
        client: a redis-py client on the tracking Redis.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._transition = client.register_script(TRANSITION_LUA)
        self._append_moves = client.register_script(APPEND_MOVES_LUA)
        self._create = client.register_script(CREATE_LUA)
        self._copy = client.register_script(COPY_LUA)

    # -- the worker's transitions, each holding the attempt's message --------------------

    def start(self, run_id: str, job_id: str, task_id: str, host: str, attempts: int,
              started_at: float, node: str | None = None,
              workdir: str | None = None) -> Transition:
        """An attempt begins: ``running``, one more attempt; refused once the run is cancelled.

        ``node``: where a floating job runs (the record and the event say it from now on).
        ``workdir``: the worker's directory, where the job's files are written.
        """
        placed = {"node": node} if node is not None else {}
        if workdir is not None:
            placed["workdir"] = workdir
        return self._apply(run_id, job_id, JobState.RUNNING, STARTABLE, task_id,
                           JobEvent(job_id, JobState.RUNNING, attempts=attempts, host=host,
                                    node=node),
                           count_attempt=True, unless_cancelled=True, host=host, **placed,
                           started_at=started_at, finished_at=None, error=None,
                           exit_code=None, duration_s=None)

    def wait_to_retry(self, run_id: str, job_id: str, task_id: str, host: str, attempts: int,
                      error: str, exit_code: int | None, history_add: list[dict[str, Any]],
                      retry_at: float) -> Transition:
        """A failed attempt is retried after a backoff: still ``running``, its error kept
        (``history_add``: the attempt's entry, appended to the history)."""
        return self._apply(run_id, job_id, JobState.RUNNING, STARTABLE, task_id,
                           JobEvent(job_id, JobState.RUNNING, attempts=attempts, host=host,
                                    error=error), on_attempt=attempts,
                           error=error, exit_code=exit_code, history_add=history_add,
                           retry_at=retry_at)

    def finish(self, run_id: str, job_id: str, task_id: str, host: str,
               attempts: int) -> Transition:
        """The script succeeded and its marker is being written: a cancel is refused now."""
        return self._apply(run_id, job_id, JobState.FINISHING, STARTABLE, task_id,
                           JobEvent(job_id, JobState.FINISHING, attempts=attempts, host=host),
                           on_attempt=attempts)

    def succeed(self, run_id: str, job_id: str, task_id: str, host: str, attempts: int,
                duration_s: float, history_add: list[dict[str, Any]]) -> Transition:
        """The marker exists: ``succeeded`` (``history_add``: the attempt's entry)."""
        return self._apply(run_id, job_id, JobState.SUCCEEDED, (JobState.FINISHING,), task_id,
                           JobEvent(job_id, JobState.SUCCEEDED, attempts=attempts, host=host,
                                    duration_s=duration_s),
                           exit_code=0, error=None, duration_s=duration_s, finished_at=now(),
                           history_add=history_add)

    def fail(self, run_id: str, job_id: str, task_id: str, host: str, attempts: int,
             error: str, **fields: Any) -> Transition:
        """The job failed for good (``fields``: exit_code, duration_s, history_add, as
        known)."""
        return self._apply(run_id, job_id, JobState.FAILED, STARTABLE, task_id,
                           JobEvent(job_id, JobState.FAILED, attempts=attempts, host=host,
                                    duration_s=fields.get("duration_s"), error=error),
                           on_attempt=attempts, error=error, finished_at=now(), **fields)

    def skip(self, run_id: str, job_id: str, task_id: str, host: str,
             attempts: int) -> Transition:
        """Its marker already existed: nothing to run (a redelivered message, a resume)."""
        return self._apply(run_id, job_id, JobState.SKIPPED, (*STARTABLE, JobState.FAILED),
                           task_id, JobEvent(job_id, JobState.SKIPPED, attempts=attempts,
                                             host=host),
                           host=host, finished_at=now())

    def drop_cancelled(self, run_id: str, job_id: str, task_id: str, host: str,
                       attempts: int) -> Transition:
        """The worker found the run cancelled as the attempt began."""
        return self._apply(run_id, job_id, JobState.CANCELLED, STARTABLE, task_id,
                           JobEvent(job_id, JobState.CANCELLED, attempts=attempts, host=host),
                           finished_at=now())

    # -- a held job's transitions (by the worker that ended its last dependency, or the head)

    def release(self, run_id: str, job_id: str) -> Transition:
        """Every job it waits for succeeded: ``queued`` (its message is moved next)."""
        return self._apply(run_id, job_id, JobState.QUEUED, (JobState.HELD,), None,
                           JobEvent(job_id, JobState.QUEUED,
                                    note="released: every job it waits for succeeded"),
                           queued_at=now())

    def hold(self, run_id: str, job_id: str, release_to: str) -> Transition:
        """A job published again (``retry``) whose dependencies have not all succeeded
        waits for them again, to be released into ``release_to``."""
        return self._apply(run_id, job_id, JobState.HELD, (JobState.QUEUED,), None,
                           JobEvent(job_id, JobState.HELD,
                                    note="held: it waits for the jobs it names in after"),
                           release_to=release_to)

    def end_held(self, run_id: str, job_id: str, reason: str) -> Transition:
        """A job it waits for failed for good or was cancelled: it ends without running."""
        return self._apply(run_id, job_id, JobState.CANCELLED, (JobState.HELD,), None,
                           JobEvent(job_id, JobState.CANCELLED, error=reason),
                           finished_at=now(), error=reason)

    def halt(self, run_id: str, job_id: str, reason: str, kill: bool) -> Transition:
        """The run halted (``--halt``): a job not started ends ``cancelled`` with the
        reason; with ``kill`` a running one too (its worker kills it, as for a cancel)."""
        allowed = (*HALTABLE, JobState.RUNNING) if kill else HALTABLE
        return self._apply(run_id, job_id, JobState.CANCELLED, allowed, None,
                           JobEvent(job_id, JobState.CANCELLED, error=reason),
                           finished_at=now(), error=reason)

    # -- a backup copy's steps (COPY_LUA) -------------------------------------------------

    def add_copy(self, run_id: str, job_id: str, holding: str, copy_task_id: str,
                 slot: str) -> Transition:
        """The head queues a backup copy of a running job on ``slot``: once per job, ever."""
        return self._copy_step("add", run_id, job_id, holding,
                               {"task_id": copy_task_id, "node": slot})

    def start_copy(self, run_id: str, job_id: str, copy_task_id: str, host: str,
                   started_at: float) -> Transition:
        """The copy begins on its slot (refused once the job ended)."""
        return self._copy_step("start", run_id, job_id, copy_task_id,
                               {"host": host, "started_at": started_at})

    def claim_copy(self, run_id: str, job_id: str, copy_task_id: str, host: str,
                   workdir: str) -> Transition:
        """The copy succeeded first: the job is ``finishing`` under the copy's task id, on
        its node; the job's own execution, superseded, is ended in the history."""
        return self._copy_step("claim", run_id, job_id, copy_task_id,
                               {"host": host, "workdir": workdir})

    def end_copy(self, run_id: str, job_id: str, copy_task_id: str,
                 entry: dict[str, Any]) -> Transition:
        """The copy's attempt failed (``entry``: its history entry); the job runs on."""
        return self._copy_step("end", run_id, job_id, copy_task_id, {"entry": entry})

    def hand_over(self, run_id: str, job_id: str, task_id: str,
                  entry: dict[str, Any]) -> Transition:
        """The job's own execution failed for good while its copy runs: the copy becomes the
        job (its task id, node and host); ``entry``: the failed attempt's history entry."""
        return self._copy_step("hand_over", run_id, job_id, task_id, {"entry": entry})

    def _copy_step(self, step: str, run_id: str, job_id: str, holding: str,
                   values: dict[str, Any]) -> Transition:
        keys = [job_key(run_id, job_id), counts_key(run_id), events_key(run_id), run_key(run_id)]
        return parse_transition(self._copy(keys=keys, args=[
            step, holding, RUN_TTL_S, job_id, EVENTS_SLACK, json.dumps(values)]))

    # -- the head node's transitions ------------------------------------------------------

    def cancel(self, run_id: str, job_id: str, client: Any = None) -> Transition | None:
        """Cancel a job not yet final (whichever message it holds)."""
        return self._apply(run_id, job_id, JobState.CANCELLED, CANCELLABLE, None,
                           JobEvent(job_id, JobState.CANCELLED), client=client,
                           finished_at=now(), error="cancelled")

    def settle_done(self, run_id: str, job_id: str, task_id: str | None) -> Transition:
        """A running job whose ``.done`` exists succeeded (its worker's final write was lost)."""
        return self._apply(run_id, job_id, JobState.SUCCEEDED, ACTIVE, task_id,
                           JobEvent(job_id, JobState.SUCCEEDED, note="settled by its .done"),
                           finished_at=now(), error=None)

    def requeue_dead(self, run_id: str, job_id: str, task_id: str | None,
                     error: str, node: str | None = None,
                     history: list[dict[str, Any]] | None = None) -> Transition:
        """A running job whose attempt died with its worker waits for redelivery (``node``:
        where it waits now; a floating job goes back to ``any``; ``history``: with the dead
        attempt in it)."""
        placed: dict[str, Any] = {"node": node} if node is not None else {}
        if history is not None:
            placed["history"] = history
        return self._apply(run_id, job_id, JobState.QUEUED, ACTIVE, task_id,
                           JobEvent(job_id, JobState.QUEUED, error=error, node=node),
                           error=error, **placed)

    def mark_lost(self, run_id: str, job_id: str, task_id: str | None,
                  error: str) -> Transition:
        """A waiting job whose message exists nowhere and that nothing runs."""
        return self._apply(run_id, job_id, JobState.LOST, (JobState.QUEUED, *ACTIVE), task_id,
                           JobEvent(job_id, JobState.LOST, error=error),
                           finished_at=now(), error=error)

    def republish(self, run_id: str, job_id: str, allowed: Iterable[JobState],
                  holding: str | None, task_id: str, node: str, attempts: int,
                  note: str | None, changes: Mapping[str, Any] | None = None) -> Transition:
        """Queued again under a new message ``task_id`` (retry: ``RETRYABLE``, move:
        ``MOVABLE``, a vanished message: ``LOST_ONLY``); ``changes``: a new node, say."""
        # The task id travels in the event: followers must know which message is current.
        return self._apply(run_id, job_id, JobState.QUEUED, allowed, holding,
                           JobEvent(job_id, JobState.QUEUED, attempts=attempts, node=node,
                                    task_id=task_id),
                           **{"task_id": task_id, "queued_at": now(), "error": note,
                              "finished_at": None, "exit_code": None, **(changes or {})})

    def _apply(self, run_id: str, job_id: str, state: JobState, allowed: Iterable[JobState],
               holding: str | None, event: JobEvent, count_attempt: bool = False,
               unless_cancelled: bool = False, client: Any = None, on_attempt: int = 0,
               **fields: Any) -> Transition | Any:
        """``on_attempt``: the attempt the record must be on (0: any)."""
        pairs: list[str] = []
        for name, value in encode(fields).items():
            pairs += [name, value]
        args = [json.dumps(str(state)), states_arg(allowed),
                json.dumps(holding) if holding else "", RUN_TTL_S,
                "1" if count_attempt else "0", "1" if unless_cancelled else "0",
                EVENTS_SLACK, job_id, event.extra(), str(on_attempt) if on_attempt else "",
                *pairs]
        keys = [job_key(run_id, job_id), counts_key(run_id), events_key(run_id), run_key(run_id)]
        result = self._transition(keys=keys, args=args, client=client)
        if client is not None:
            return None
        return parse_transition(result)

    # -- records without a change of state ------------------------------------------------

    def create_jobs(self, run_id: str, rows: Iterable[tuple[str, str, str, str]],
                    queued_at: float, client: Any) -> None:
        """Queued records, created server-side: ``rows`` of (job id, spec JSON, node JSON,
        task id JSON), queued on the pipeline ``client``, with the run's job list."""
        args: list[Any] = [job_key(run_id, ""), RUN_TTL_S, json.dumps(queued_at)]
        job_ids: list[str] = []
        for job_id, spec, node, task_id in rows:
            args += [job_id, spec, node, task_id]
            job_ids.append(job_id)
        self._create(args=args, client=client)
        client.rpush(jobs_key(run_id), *job_ids)

    def mark(self, run_id: str, job_id: str, client: Any, **fields: Any) -> None:
        """Fields set at creation, before the run is visible (pin; a recovered job skipped)."""
        client.hset(job_key(run_id, job_id), mapping=encode(fields))

    def add_duration(self, run_id: str, script: str, seconds: float,
                     pipe: redis.client.Pipeline | None = None) -> None:
        """A succeeded job's duration, for the median of its script's (``median``); queued on
        ``pipe`` when given (its caller executes it)."""
        batch = pipe if pipe is not None else self.client.pipeline(transaction=False)
        key = f"{run_key(run_id)}:durations:{script}"  # list: the script's succeeded jobs
        batch.rpush(key, seconds)
        batch.expire(key, RUN_TTL_S)
        if pipe is None:
            batch.execute()

    def median(self, run_id: str, script: str,
               at_least: int = MEDIAN_MIN_JOBS) -> tuple[float, int] | None:
        """The median duration of the run's succeeded jobs of ``script`` and how many they
        are, once there are ``at_least`` of them (GNU parallel's rule); else None."""
        values = []
        for raw in self.client.lrange(f"{run_key(run_id)}:durations:{script}", 0, -1):
            with contextlib.suppress(ValueError):  # an entry edited by hand is left out
                values.append(float(raw))
        values.sort()
        if len(values) < at_least:
            return None
        return statistics.median(values), len(values)

    def add_busy(self, node: str, seconds: float,
                 pipe: redis.client.Pipeline | None = None) -> None:
        """An attempt's seconds on ``node`` (the busy metric); queued on ``pipe`` when given."""
        (pipe if pipe is not None else self.client).hincrbyfloat(busy_key(), node, seconds)

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
        return decode({name: value for name, value in zip(names, values, strict=True)
                       if value is not None})

    # -- the run record -------------------------------------------------------------------

    def create_run(self, run_id: str, metadata: Mapping[str, Any], counts: Mapping[str, int],
                   created_at: float) -> None:
        """The run's metadata and counters, written last and at once: until then no reader
        sees a half-recorded run. The run starts ``publishing``."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(counts_key(run_id), mapping={str(state): count
                                               for state, count in counts.items()})
        pipe.hset(run_key(run_id), mapping=encode({"run_id": run_id,
                                                   "state": RunState.PUBLISHING,
                                                   "created_at": created_at, **metadata}))
        for key in run_keys(run_id):
            pipe.expire(key, RUN_TTL_S)
        pipe.zadd(runs_key(), {run_id: created_at})
        pipe.zremrangebyscore(runs_key(), 0, created_at - RUN_TTL_S)  # runs whose records expired
        pipe.execute()

    def counts(self, run_id: str) -> Counter[JobState]:
        """Jobs per state, from the run's counters (kept by every transition)."""
        return counts_of(self.client.hgetall(counts_key(run_id)))

    def set_run_state(self, run_id: str, state: RunState) -> None:
        self.client.hset(run_key(run_id), "state", json.dumps(str(state)))

    def run_cancelled(self, run_id: str) -> bool:
        state = self.client.hget(run_key(run_id), "state")
        return state is not None and json.loads(state) == RunState.CANCELLED

    def add_moves(self, run_id: str, moves: list[dict[str, Any]]) -> None:
        """Append to the run's record of what moved where, atomically (concurrent movers)."""
        if moves:
            self._append_moves(keys=[run_key(run_id)], args=[json.dumps(moves)])


def parse_transition(result: list[Any]) -> Transition:
    outcome, previous, attempts = result
    outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
    previous = previous.decode() if isinstance(previous, bytes) else previous
    return Transition(outcome=TransitionOutcome(outcome),
                      previous=JobState(json.loads(previous)) if previous else None,
                      attempts=int(attempts))


def now() -> float:
    return round(time.time(), 3)
