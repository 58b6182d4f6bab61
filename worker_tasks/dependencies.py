"""Jobs that wait for other jobs of their run (``"after"``): holding, releasing, ending.

The head publishes a held job's message like any other, signed, but into a list of its own
on the broker (``hold_queue``), which no worker consumes. Whoever sees a job end decides
for the jobs that wait on it, so a run with dependencies completes with no head following:

* the worker that records a job's success (or a skip: its ``.done`` existed) releases each
  dependent whose every dependency has now succeeded: the record goes ``held`` ->
  ``queued``, then the message moves from its hold list into its queue (``MOVE_LUA``: one
  atomic step on the broker, so two releasers never move it twice);
* the worker that records a job's final failure, or its cancel, ends each dependent
  without running it (``cancelled``, the reason naming the job), and theirs in turn;
* the head's scheduler does the same for any held job it finds ready or doomed (a worker
  killed between the two steps, a broker restarted between them).

A run may wait for other runs (``submit --after RUN``, Slurm's ``afterok``; with
``--after-any``, ``afterany``): every job of it is published held, and the run is listed
among each awaited run's waiters. The worker that ends the last job of an awaited run
settles its waiters (``settle_run``): a waiter whose every awaited run came to what it
waits for is released (each of its jobs whose own dependencies are met); one whose awaited
run failed (``afterok``) ends cancelled, every held job with the reason. The hold lives in
Redis: a head restarted, or never there, changes nothing.

Every step is idempotent: a record already released is not released again, an empty hold
list moves nothing. The message a release moves is the one the head signed; a message
moved early by hand finds its record still ``held``, and the worker runs nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

import redis

from worker_tasks.kinds import fits
from worker_tasks.tracking import (
    KEY_PREFIX,
    JobState,
    JobTracker,
    RunState,
    counts_key,
    counts_of,
    job_key,
    jobs_key,
    run_key,
    state_of,
    value_of,
)

logger = logging.getLogger("worker_tasks.dependencies")

# A record's fields this module reads: the jobs it waits for, those that wait for it, and
# the queue a held job is released into.
AFTER_FIELD = "after"
DEPENDENTS_FIELD = "dependents"
RELEASE_TO_FIELD = "release_to"
# A run's metadata: the runs it waits for (run id -> "afterok" or "afterany"), and whether
# they came to what it waits for (its jobs may then be released), or why it ended.
AFTER_RUNS_FIELD = "after_runs"
RUNS_RELEASED_FIELD = "runs_released"
ENDED_BECAUSE_FIELD = "ended_because"
AFTER_OK, AFTER_ANY = "afterok", "afterany"

# Move the one message of a hold list into its queue, and say in its envelope which queue
# it was delivered from (kombu puts an unacknowledged message back where that says).
# KEYS: 1 hold list, 2 the queue. ARGV: 1 the hold list's name as the envelope spells it,
# 2 the queue's name. Returns 1 if a message moved, 0 if the list was empty.
MOVE_LUA = """
local item = redis.call('RPOP', KEYS[1])
if not item then return 0 end
local needle = '"routing_key": "' .. ARGV[1] .. '"'
local first, last = string.find(item, needle, 1, true)
if first then
  item = string.sub(item, 1, first - 1) .. '"routing_key": "' .. ARGV[2] .. '"' ..
         string.sub(item, last + 1)
end
redis.call('LPUSH', KEYS[2], item)
return 1
"""


def hold_queue(run_id: str, job_id: str) -> str:
    """The broker list a held job's message waits in until its release."""
    return f"{KEY_PREFIX}:held:{run_id}:{job_id}"


def waiters_key(run_id: str) -> str:
    """The set of runs that wait for ``run_id`` (on the tracking Redis)."""
    return f"{KEY_PREFIX}:run:{run_id}:waiters"


def run_outcome(tracking: redis.Redis, run_id: str) -> str | None:
    """``active`` until every job of the run is final, then ``succeeded``, ``cancelled`` or
    ``failed``; None when no such run is recorded (never, or expired)."""
    state = tracking.hget(run_key(run_id), "state")
    if state is None:
        return None
    counts = counts_of(tracking.hgetall(counts_key(run_id)))
    if any(not job_state.is_final for job_state in counts):
        return "active"
    if json.loads(state) == RunState.CANCELLED:
        return "cancelled"
    return "succeeded" if all(job_state.is_success for job_state in counts) else "failed"


class Dependencies:
    """What a job's end means for the jobs of its run that wait for it.

    Parameters:
        tracking: a client on the tracking Redis (the records).
        broker: a client on the broker (the hold lists and the queues).
    """

    def __init__(self, tracking: redis.Redis, broker: redis.Redis) -> None:
        self.tracking = tracking
        self.broker = broker
        self.tracker = JobTracker(tracking)
        self._move = broker.register_script(MOVE_LUA)

    # -- hooks, named for the moment they run ---------------------------------------------

    def after_success(self, run_id: str, job_id: str) -> list[str]:
        """``job_id`` succeeded (or was skipped): release each dependent now ready."""
        return [dependent for dependent in self.dependents(run_id, job_id)
                if self.release_if_ready(run_id, dependent)]

    def after_run_end(self, run_id: str) -> None:
        """A job of ``run_id`` ended: if that was its last, settle the runs that wait for it."""
        waiters = [raw.decode() for raw in self.tracking.smembers(waiters_key(run_id))]
        if waiters and run_outcome(self.tracking, run_id) != "active":
            for waiter in sorted(waiters):
                self.settle_run(waiter)

    def after_failure(self, run_id: str, job_id: str, why: str) -> list[str]:
        """``job_id`` failed for good or was cancelled: end its dependents, and theirs."""
        ended: list[str] = []
        pending = [(dependent, f"dependency {job_id} {why}")
                   for dependent in self.dependents(run_id, job_id)]
        seen: set[str] = set()
        while pending:  # breadth first: a chain of any length, each job once
            dependent, reason = pending.pop(0)
            if dependent in seen:
                continue
            seen.add(dependent)
            if self.end(run_id, dependent, reason):
                ended.append(dependent)
                pending += [(later, f"dependency {dependent} was not run ({reason})")
                            for later in self.dependents(run_id, dependent)]
        return ended

    # -- decisions ----------------------------------------------------------------------------

    def settle(self, run_id: str, held: Iterable[str]) -> tuple[list[str], list[str]]:
        """The head's pass over its held jobs: (released, ended)."""
        released, ended = [], []
        for job_id in held:
            states = self.waited_states(run_id, job_id)
            failed = [(name, state) for name, state in states.items()
                      if state is not None and state.is_final and not state.is_success]
            if failed:
                name, state = failed[0]
                reason = f"dependency {name} {'failed' if state is JobState.FAILED else state}"
                if self.end(run_id, job_id, reason):
                    ended.append(job_id)
                    ended += self.after_failure(run_id, job_id, "was not run")
            elif self.release_if_ready(run_id, job_id):
                released.append(job_id)
        return released, ended

    def settle_run(self, run_id: str) -> str | None:
        """Release a run whose awaited runs came to what it waits for, or end it when one
        cannot; None while it still waits. Returns ``released`` or why it ended."""
        after = self.after_runs(run_id)
        if not after:
            return None
        outcomes = {awaited: run_outcome(self.tracking, awaited) for awaited in after}
        for awaited, outcome in outcomes.items():
            if outcome is None:
                return self.end_run(run_id, f"run {awaited} it waits for is not recorded "
                                            f"(expired)")
            if after[awaited] == AFTER_OK and outcome in ("failed", "cancelled"):
                return self.end_run(run_id, f"run {awaited} it waits for {outcome}")
        if any(outcome == "active" for outcome in outcomes.values()):
            return None
        self.tracking.hset(run_key(run_id), RUNS_RELEASED_FIELD, json.dumps(True))
        released = [job_id for job_id in self.held_jobs(run_id)
                    if self.release_if_ready(run_id, job_id)]
        if released:
            logger.info("run %s released: the runs it waits for ended as it asked (%d jobs)",
                        run_id, len(released))
        return "released"

    def end_run(self, run_id: str, reason: str) -> str:
        """A run that can never start ends cancelled: each held job with ``reason``."""
        self.tracking.hset(run_key(run_id), mapping={
            ENDED_BECAUSE_FIELD: json.dumps(reason), "state": json.dumps(RunState.CANCELLED)})
        for job_id in self.held_jobs(run_id):
            self.end(run_id, job_id, reason)
        self.after_run_end(run_id)  # runs that wait for this one learn it ended
        return reason

    def after_runs(self, run_id: str) -> dict[str, str]:
        raw = self.tracking.hget(run_key(run_id), AFTER_RUNS_FIELD)
        return dict(json.loads(raw)) if raw else {}

    def held_jobs(self, run_id: str) -> list[str]:
        """The run's jobs that are held now, in jobs-file order (one pipelined read)."""
        job_ids = [raw.decode() for raw in self.tracking.lrange(jobs_key(run_id), 0, -1)]
        pipe = self.tracking.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(run_id, job_id), "state")
        return [job_id for job_id, state in zip(job_ids, pipe.execute(), strict=True)
                if state is not None and json.loads(state) == JobState.HELD]

    def release_if_ready(self, run_id: str, job_id: str) -> bool:
        """Release ``job_id`` if every job it waits for succeeded (True if this call did)."""
        if not self.ready(run_id, job_id):
            return False
        released = self.tracker.release(run_id, job_id).ok
        # Moved even when another releaser won the record: its move may not have happened.
        self.move(run_id, job_id)
        if released:
            logger.info("job %s of run %s released: every job it waits for succeeded",
                        job_id, run_id)
        return released

    def ready(self, run_id: str, job_id: str) -> bool:
        """Every job it waits for succeeded, and its run waits for no run any more."""
        held, released = self.tracking.hmget(run_key(run_id),
                                             [AFTER_RUNS_FIELD, RUNS_RELEASED_FIELD])
        if held is not None and released is None:
            return False
        states = self.waited_states(run_id, job_id)
        return all(state is not None and state.is_success for state in states.values())

    def end(self, run_id: str, job_id: str, reason: str) -> bool:
        """End a held job without running it; its message is deleted from its hold list."""
        ended = self.tracker.end_held(run_id, job_id, reason).ok
        if ended:
            self.broker.delete(hold_queue(run_id, job_id))
            logger.info("job %s of run %s ended without running: %s", job_id, run_id, reason)
        return ended

    def move(self, run_id: str, job_id: str) -> bool:
        """The job's message from its hold list into its queue, if both are known."""
        raw = self.tracking.hmget(job_key(run_id, job_id), ["state", RELEASE_TO_FIELD])
        state, queue = (json.loads(value) if value is not None else None for value in raw)
        if queue is None or state == JobState.HELD:
            return False
        hold = hold_queue(run_id, job_id)
        return bool(self._move(keys=[hold, queue], args=[hold, queue]))

    # -- reading the records ------------------------------------------------------------------

    def dependents(self, run_id: str, job_id: str) -> list[str]:
        raw = self.tracking.hget(job_key(run_id, job_id), DEPENDENTS_FIELD)
        return list(json.loads(raw)) if raw else []

    def waited_states(self, run_id: str, job_id: str) -> dict[str, JobState | None]:
        """The state of each job ``job_id`` waits for (None: no record)."""
        spec = value_of(self.tracking.hget(job_key(run_id, job_id), "spec"))
        after = spec.get(AFTER_FIELD) if isinstance(spec, dict) else None
        names = after if fits(after, list[str]) else []  # else edited by hand: none it can name
        pipe = self.tracking.pipeline(transaction=False)
        for name in names:
            pipe.hget(job_key(run_id, name), "state")
        return {name: state_of(value_of(value)) if value is not None else None
                for name, value in zip(names, pipe.execute(), strict=True)}
