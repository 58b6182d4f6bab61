"""The job state machine against the real Lua on a real Redis: every transition of the
table in ``worker_tasks/tracking.py`` applied from every state, allowed or refused."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

from coordinator.redis_server import RedisServer
from worker_tasks.tracking import (
    LOST_ONLY,
    MOVABLE,
    RETRYABLE,
    JobEvent,
    JobState,
    JobTracker,
    RunState,
    Transition,
    counts_key,
    events_key,
    job_key,
    run_key,
)

TASK = "run.job.0"
HOST = "rig-t@box"
_runs = itertools.count()

Call = Callable[[JobTracker, str, str], Transition | None]
Q, R, FIN, S, F, SK, C, L, H = (JobState.QUEUED, JobState.RUNNING, JobState.FINISHING,
                                JobState.SUCCEEDED, JobState.FAILED, JobState.SKIPPED,
                                JobState.CANCELLED, JobState.LOST, JobState.HELD)

def on(tracker: JobTracker, run_id: str, job_id: str) -> int:
    """The attempt the job's record is on: what its worker's own steps say."""
    return int(tracker.record(run_id, job_id, "attempts")["attempts"])


# method -> (from states, the state it leads to, the call), spelled out as in the module
# docstring's table (not taken from the module: a changed rule must turn this red).
TABLE: dict[str, tuple[tuple[JobState, ...], JobState, Call]] = {
    "start": ((Q, R, FIN, L), JobState.RUNNING,
              lambda t, r, j: t.start(r, j, TASK, HOST, 0, started_at=1.0)),
    "wait_to_retry": ((Q, R, FIN, L), JobState.RUNNING,
                      lambda t, r, j: t.wait_to_retry(r, j, TASK, HOST, on(t, r, j), "boom", 3,
                                                      [], 9.0)),
    "finish": ((Q, R, FIN, L), JobState.FINISHING,
               lambda t, r, j: t.finish(r, j, TASK, HOST, on(t, r, j))),
    "succeed": ((FIN,), JobState.SUCCEEDED,
                lambda t, r, j: t.succeed(r, j, TASK, HOST, 1, duration_s=2.0, history_add=[])),
    "fail": ((Q, R, FIN, L), JobState.FAILED,
             lambda t, r, j: t.fail(r, j, TASK, HOST, on(t, r, j), error="exit 3", exit_code=3)),
    "skip": ((Q, R, FIN, L, F), JobState.SKIPPED,
             lambda t, r, j: t.skip(r, j, TASK, HOST, 0)),
    "drop_cancelled": ((Q, R, FIN, L), JobState.CANCELLED,
                       lambda t, r, j: t.drop_cancelled(r, j, TASK, HOST, 0)),
    "cancel": ((Q, R, L, H), JobState.CANCELLED, lambda t, r, j: t.cancel(r, j)),
    "release": ((H,), JobState.QUEUED, lambda t, r, j: t.release(r, j)),
    "end_held": ((H,), JobState.CANCELLED,
                 lambda t, r, j: t.end_held(r, j, "dependency f failed")),
    "hold": ((Q,), JobState.HELD, lambda t, r, j: t.hold(r, j, "node.rig-t")),
    "settle_done": ((R, FIN), JobState.SUCCEEDED, lambda t, r, j: t.settle_done(r, j, TASK)),
    "requeue_dead": ((R, FIN), JobState.QUEUED,
                     lambda t, r, j: t.requeue_dead(r, j, TASK, "died with its worker")),
    "mark_lost": ((Q, R, FIN), JobState.LOST,
                  lambda t, r, j: t.mark_lost(r, j, TASK, "message gone")),
    "republish retry": ((F, C, L), JobState.QUEUED,
                        lambda t, r, j: t.republish(r, j, RETRYABLE, TASK, "run.job.1", "rig-t",
                                                    1, "again")),
    "republish move": ((Q, L, R), JobState.QUEUED,
                       lambda t, r, j: t.republish(r, j, MOVABLE, TASK, "run.job.1", "rig-u", 1,
                                                   "moved", {"node": "rig-u"})),
    "republish lost": ((L,), JobState.QUEUED,
                       lambda t, r, j: t.republish(r, j, LOST_ONLY, TASK, "run.job.1", "rig-t",
                                                   1, "vanished")),
}


@pytest.fixture()
def tracker(redis_server: RedisServer) -> JobTracker:
    return JobTracker(redis.Redis.from_url(redis_server.url))


def a_job_in(tracker: JobTracker, state: JobState) -> tuple[str, str]:
    """A fresh run with one job recorded in ``state``, holding message ``TASK`` (past queued:
    on its first attempt)."""
    run_id = f"table-{next(_runs)}"
    client = tracker.client
    pipe = client.pipeline(transaction=False)
    tracker.create_jobs(run_id, [("j", json.dumps({}), json.dumps("rig-t"), json.dumps(TASK))],
                        1.0, client=pipe)
    pipe.execute()
    tracker.create_run(run_id, {"jobs_total": 1}, {JobState.QUEUED: 1}, 1.0)
    tracker.set_run_state(run_id, RunState.ACTIVE)
    if state is not JobState.QUEUED:
        client.hset(job_key(run_id, "j"), "attempts", 1)
        client.hset(job_key(run_id, "j"), "state", json.dumps(str(state)))
        client.hset(counts_key(run_id), mapping={str(JobState.QUEUED): 0, str(state): 1})
    return run_id, "j"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_transition_is_allowed_from_its_states_and_refused_from_every_other(
        tracker: JobTracker, name: str) -> None:
    allowed, target, call = TABLE[name]
    for state in JobState:
        run_id, job_id = a_job_in(tracker, state)
        before = tracker.record(run_id, job_id)
        result = call(tracker, run_id, job_id)
        assert result is not None
        after = tracker.record(run_id, job_id)
        counts = {k.decode(): int(v) for k, v in
                  tracker.client.hgetall(counts_key(run_id)).items() if int(v)}
        if state in allowed:
            assert result.ok, (name, state, result)
            assert result.previous is state
            assert after["state"] == target
            assert counts == {str(target): 1}
            (_, fields), = tracker.client.xrange(events_key(run_id))
            assert JobEvent.from_stream(fields).state is target
        else:
            assert (result.outcome, result.previous) == ("refused", state), (name, state)
            assert after == before
            assert counts == {str(state): 1}
            assert tracker.client.xlen(events_key(run_id)) == 0


def test_a_stale_message_touches_nothing(tracker: JobTracker) -> None:
    run_id, job_id = a_job_in(tracker, JobState.RUNNING)
    result = tracker.fail(run_id, job_id, "run.job.7", HOST, 1, error="late")
    assert (result.outcome, tracker.record(run_id, job_id)["state"]) == ("superseded", "running")


def test_start_counts_an_attempt_and_is_refused_in_a_cancelled_run(tracker: JobTracker) -> None:
    run_id, job_id = a_job_in(tracker, JobState.QUEUED)
    assert tracker.start(run_id, job_id, TASK, HOST, 0, started_at=1.0).attempts == 1
    assert tracker.start(run_id, job_id, TASK, HOST, 1, started_at=2.0).attempts == 2
    tracker.set_run_state(run_id, RunState.CANCELLED)
    assert tracker.start(run_id, job_id, TASK, HOST, 2, started_at=3.0).outcome == "cancelled"
    assert tracker.run_cancelled(run_id)


def test_the_event_carries_what_followers_read(tracker: JobTracker) -> None:
    run_id, job_id = a_job_in(tracker, JobState.LOST)
    tracker.republish(run_id, job_id, LOST_ONLY, TASK, "run.job.1", "rig-u", 2, "again",
                      {"node": "rig-u"})
    tracker.start(run_id, job_id, "run.job.1", HOST, 2, started_at=5.0)
    tracker.fail(run_id, job_id, "run.job.1", HOST, 2, error="first line\nsecond line")
    events = [JobEvent.from_stream(fields) for _, fields in
              tracker.client.xrange(events_key(run_id))]
    assert events == [
        JobEvent(job_id, JobState.QUEUED, attempts=2, task_id="run.job.1", node="rig-u"),
        JobEvent(job_id, JobState.RUNNING, attempts=2, host=HOST),
        JobEvent(job_id, JobState.FAILED, attempts=2, host=HOST, error="first line")]
    assert tracker.record(run_id, job_id, "node", "attempts") == {"node": "rig-u", "attempts": 2}


def test_a_hand_made_stream_entry_is_read_as_no_event_or_without_its_wrong_fields(
        tracker: JobTracker) -> None:
    """Anyone who can write to Redis can add to a run's change stream: an entry naming no
    job, or no state of this version, is no event; fields of the wrong kind are left out."""
    run_id, job_id = a_job_in(tracker, JobState.QUEUED)
    key = events_key(run_id)
    for fields in ({"job": job_id, "state": '"zzz"'}, {"state": '"running"'},
                   {"job": job_id, "state": "5"}, {"job": job_id, "state": "not json"}):
        tracker.client.xadd(key, fields)
    tracker.client.xadd(key, {"job": job_id, "state": '"running"', "extra": "[1]"})
    tracker.client.xadd(key, {"job": job_id, "state": '"running"',
                              "extra": '{"attempts": "abc", "host": 5, "node": "rig-z"}'})
    events = [JobEvent.from_stream(fields) for _, fields in tracker.client.xrange(key)]
    assert events == [None] * 4 + [JobEvent(job_id, JobState.RUNNING),
                                   JobEvent(job_id, JobState.RUNNING, node="rig-z")]


def test_an_overtaken_attempt_ends_nothing(tracker: JobTracker) -> None:
    """Attempt 1's worker was taken for dead and attempt 2 started elsewhere (same message):
    attempt 1 can neither finish, fail nor retry the job; attempt 2 can."""
    run_id, job_id = a_job_in(tracker, JobState.RUNNING)
    tracker.client.hset(job_key(run_id, job_id), "attempts", 2)
    before = tracker.record(run_id, job_id)
    for step in (lambda attempt: tracker.finish(run_id, job_id, TASK, HOST, attempt),
                 lambda attempt: tracker.fail(run_id, job_id, TASK, HOST, attempt, error="x"),
                 lambda attempt: tracker.wait_to_retry(run_id, job_id, TASK, HOST, attempt,
                                                       "boom", 3, [], 9.0)):
        moved = step(1)
        assert (moved.outcome, moved.previous) == ("superseded", JobState.RUNNING)
        assert tracker.record(run_id, job_id) == before
    assert tracker.finish(run_id, job_id, TASK, HOST, 2).ok


def test_moves_appended_by_two_writers_are_both_kept(tracker: JobTracker) -> None:
    run_id, _ = a_job_in(tracker, JobState.QUEUED)
    first: list[dict[str, Any]] = [{"from": "rig-a", "to": "rig-b", "jobs": ["x"], "at": 1.5}]
    second: list[dict[str, Any]] = [{"from": "rig-c", "to": "rig-b", "jobs": ["y", "z"],
                                     "at": 2.5}]
    other = JobTracker(redis.Redis(connection_pool=tracker.client.connection_pool))
    tracker.add_moves(run_id, first)
    other.add_moves(run_id, second)
    assert json.loads(tracker.client.hget(run_key(run_id), "moves")) == first + second


COPY = "run.job.1"


def a_copied_job(tracker: JobTracker, copy_state: str = "running") -> tuple[str, str]:
    """A running job (message ``TASK``, attempt 1 on rig-t) with a backup copy ``COPY`` on
    rig-u, queued or started."""
    run_id, job_id = a_job_in(tracker, JobState.QUEUED)
    assert tracker.start(run_id, job_id, TASK, HOST, 0, started_at=100.0, node="rig-t").ok
    assert tracker.add_copy(run_id, job_id, TASK, COPY, "rig-u").ok
    if copy_state == "running":
        assert tracker.start_copy(run_id, job_id, COPY, "rig-u@box", 200.0).ok
    return run_id, job_id


def test_a_job_gets_one_backup_copy_ever_and_only_while_it_runs(tracker: JobTracker) -> None:
    run_id, job_id = a_copied_job(tracker)
    assert tracker.add_copy(run_id, job_id, TASK, "run.job.2", "rig-v").outcome == "refused"
    assert tracker.record(run_id, job_id)["copy"]["task_id"] == COPY
    queued_id, queued_job = a_job_in(tracker, JobState.QUEUED)
    assert tracker.add_copy(queued_id, queued_job, TASK, COPY, "rig-u").outcome == "refused"
    stale = a_job_in(tracker, JobState.RUNNING)
    assert tracker.add_copy(*stale, "run.job.9", COPY, "rig-u").outcome == "superseded"


def test_the_copy_that_claims_first_takes_the_job_and_the_original_is_superseded(
        tracker: JobTracker) -> None:
    run_id, job_id = a_copied_job(tracker)
    claim = tracker.claim_copy(run_id, job_id, COPY, "rig-u@box", "/data")
    assert claim.ok and claim.previous is JobState.RUNNING
    record = tracker.record(run_id, job_id)
    assert (record["state"], record["task_id"], record["node"], record["host"]) == (
        "finishing", COPY, "rig-u", "rig-u@box")
    assert record["copy"]["state"] == "won"
    (entry,) = record["history"]
    assert (entry["attempt"], entry["node"], entry["superseded"]) == (1, "rig-t", True)
    # The original finishes a moment later: too late, under a message no longer current.
    assert tracker.finish(run_id, job_id, TASK, HOST, 1).outcome == "superseded"
    assert tracker.claim_copy(run_id, job_id, COPY, "rig-u@box", "/data").outcome == "refused"
    assert tracker.succeed(run_id, job_id, COPY, "rig-u@box", 1, duration_s=1.0,
                           history_add=[{"attempt": "copy"}]).ok
    assert [e["attempt"] for e in tracker.record(run_id, job_id)["history"]] == [1, "copy"]


def test_the_original_that_finishes_first_supersedes_its_copy(tracker: JobTracker) -> None:
    run_id, job_id = a_copied_job(tracker)
    assert tracker.finish(run_id, job_id, TASK, HOST, 1).ok
    record = tracker.record(run_id, job_id)
    assert record["copy"]["state"] == "superseded"
    (entry,) = record["history"]
    assert (entry["attempt"], entry["node"], entry["copy"]) == ("copy", "rig-u", True)
    assert "own execution finished first" in entry["error"]
    assert tracker.claim_copy(run_id, job_id, COPY, "rig-u@box", "/d").outcome == "superseded"
    # A copy that never started leaves no execution to account for.
    queued = a_copied_job(tracker, copy_state="queued")
    assert tracker.cancel(*queued).ok
    assert tracker.record(*queued).get("history") is None
    assert tracker.start_copy(*queued, COPY, "rig-u@box", 1.0).outcome == "superseded"


def test_a_copy_delivered_again_keeps_the_execution_that_died_in_the_history(
        tracker: JobTracker) -> None:
    run_id, job_id = a_copied_job(tracker)
    assert tracker.start_copy(run_id, job_id, COPY, "rig-u@box", 300.0).ok  # its worker died
    (entry,) = tracker.record(run_id, job_id)["history"]
    assert (entry["attempt"], entry["host"], entry["started_at"]) == ("copy", "rig-u@box", 200.0)
    assert "died with its worker" in entry["error"] and entry["superseded"] is False
    assert tracker.record(run_id, job_id)["copy"]["started_at"] == 300.0


def test_a_failed_copy_leaves_the_job_running_and_a_failed_original_hands_over(
        tracker: JobTracker) -> None:
    run_id, job_id = a_copied_job(tracker)
    assert tracker.end_copy(run_id, job_id, COPY, {"attempt": "copy", "exit_code": 1}).ok
    record = tracker.record(run_id, job_id)
    assert (record["state"], record["task_id"], record["copy"]["state"]) == (
        "running", TASK, "failed")
    assert tracker.hand_over(run_id, job_id, TASK, {"attempt": 1}).outcome == "refused"
    run_id, job_id = a_copied_job(tracker)
    assert tracker.hand_over(run_id, job_id, TASK, {"attempt": 1, "exit_code": 1}).ok
    record = tracker.record(run_id, job_id)
    assert (record["state"], record["task_id"], record["node"], record["copy"]["state"]) == (
        "running", COPY, "rig-u", "took over")
    # The copy now is the job: its claim holds, and the original's message is stale.
    assert tracker.fail(run_id, job_id, TASK, HOST, 1, error="x").outcome == "superseded"
    assert tracker.claim_copy(run_id, job_id, COPY, "rig-u@box", "/d").ok
