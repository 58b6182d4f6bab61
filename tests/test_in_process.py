"""Fast in-process tests of the modules that the end-to-end tests otherwise cover only
through workers: following a run, settling records, the node lease, presence.

A real Redis (the suite's); no workers, no messages: runs are recorded with
``record_run`` and moved with the same tracker transitions workers use.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from pathlib import Path

import pytest
import redis

from coordinator import follow
from coordinator.cluster_view import Liveness
from coordinator.follow import RunFollower
from coordinator.options import SubmitOptions
from coordinator.placement import AsFiled, FirstFreeSlot, LeastLoaded, loads_of, placed
from coordinator.reconcile import settle
from coordinator.records import FOLLOW_FIELDS, read_status
from coordinator.redis_server import RedisServer
from coordinator.submission import prepare, record_run, task_id_for
from tests.helpers import echo_job
from worker_tasks import presence
from worker_tasks.lease import SlotLease, make_token
from worker_tasks.retries import MAX_BACKOFF_S, Retries
from worker_tasks.tracking import EVENTS_SLACK, JobState, JobTracker, events_key

HOST = "rig-x@box"
_numbers = itertools.count()


@pytest.fixture()
def client(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def recorded_run(client: redis.Redis, tmp_path: Path, count: int = 3) -> tuple[str, list[str]]:
    """A run of ``count`` queued jobs on rig-x, recorded (nothing published)."""
    jobs = [echo_job(f"j{index}", "rig-x", "ip") for index in range(count)]
    plan = prepare(jobs, SubmitOptions(output_dir="ip", workdir=tmp_path),
                   run_id=f"inproc-{next(_numbers)}")
    record_run(client, plan)
    return plan.run_id, [task_id_for(spec) for spec in plan.specs]


def test_a_follower_applies_each_transition_from_the_stream(client: redis.Redis,
                                                            tmp_path: Path) -> None:
    run_id, tasks = recorded_run(client, tmp_path)
    follower = RunFollower(client, run_id)
    assert follower.poll() is True  # the first poll loads everything
    assert follower.poll() is False  # nothing happened since
    tracker = JobTracker(client)
    tracker.start(run_id, "j0", tasks[0], HOST, 0, started_at=1.0)
    tracker.fail(run_id, "j1", tasks[1], HOST, 0, error="exit 3\nmore")
    assert follower.poll() is True
    jobs = {job.job_id: job for job in follower.status().jobs}
    assert (jobs["j0"].state, jobs["j0"].host) == (JobState.RUNNING, HOST)
    assert (jobs["j1"].state, jobs["j1"].error) == (JobState.FAILED, "exit 3")
    assert jobs["j2"].state is JobState.QUEUED
    assert follower.counts() == read_status(client, run_id, FOLLOW_FIELDS).counts


def test_a_follower_reads_a_burst_of_transitions_in_one_poll(
        client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A change wakes the follower, which reads on for BURST_S (long here) before it reports:
    # the transitions that follow within it come with the first, in the same poll.
    monkeypatch.setattr(follow, "BURST_S", 1.0)
    run_id, tasks = recorded_run(client, tmp_path)
    follower = RunFollower(client, run_id)
    follower.poll()
    tracker = JobTracker(client)

    def burst() -> None:
        tracker.start(run_id, "j0", tasks[0], HOST, 0, started_at=1.0)
        deadline = time.monotonic() + 10
        while follower.jobs["j0"].state is not JobState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.3)  # well after the poll woke: only a read that goes on sees what follows
        for index in (1, 2):
            tracker.start(run_id, f"j{index}", tasks[index], HOST, 0, started_at=1.0)

    writer = threading.Thread(target=burst)
    writer.start()
    try:
        assert follower.poll(block=10) is True
    finally:
        writer.join(timeout=15)
    assert [job.state for job in follower.status().jobs] == [JobState.RUNNING] * 3


def test_a_follower_tells_the_end_of_a_run_without_reading_on(
        client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "BURST_S", 30.0)
    run_id, tasks = recorded_run(client, tmp_path, count=1)
    follower = RunFollower(client, run_id)
    follower.poll()
    tracker = JobTracker(client)
    tracker.start(run_id, "j0", tasks[0], HOST, 0, started_at=1.0)
    tracker.fail(run_id, "j0", tasks[0], HOST, 0, error="exit 1")
    start = time.monotonic()
    assert follower.poll(block=10) is True
    assert follower.over() and time.monotonic() - start < 15  # not the 30 s of a burst


def test_a_follower_reloads_when_the_stream_was_trimmed(client: redis.Redis,
                                                        tmp_path: Path) -> None:
    run_id, tasks = recorded_run(client, tmp_path)
    follower = RunFollower(client, run_id)
    follower.poll()
    JobTracker(client).start(run_id, "j2", tasks[2], HOST, 0, started_at=1.0)
    client.xtrim(events_key(run_id), maxlen=0)  # the entry is gone before it was read
    assert follower.poll() is True
    assert {job.job_id: job.state for job in follower.status().jobs}["j2"] is JobState.RUNNING
    assert EVENTS_SLACK > 0


def test_settle_succeeds_a_job_by_its_done_and_requeues_a_dead_attempt(
        client: redis.Redis, tmp_path: Path) -> None:
    run_id, tasks = recorded_run(client, tmp_path)
    tracker = JobTracker(client)
    for index in (0, 1):
        tracker.start(run_id, f"j{index}", tasks[index], HOST, 0, started_at=1.0)
    (tmp_path / "ip").mkdir()
    (tmp_path / "ip" / "j0.json.done").write_text("{}\n")
    running = [job for job in read_status(client, run_id).jobs if job.state is JobState.RUNNING]
    notes = settle(client, run_id, running, Liveness(), tmp_path)
    assert notes == [
        "j0: succeeded (its .done exists; its worker's final write was lost)",
        f"j1: requeued (attempt 1 died with its worker {HOST}; the job is delivered again "
        f"when a worker serves rig-x)"]
    states = {job.job_id: job.state for job in read_status(client, run_id).jobs}
    assert states == {"j0": JobState.SUCCEEDED, "j1": JobState.QUEUED, "j2": JobState.QUEUED}


def test_settle_leaves_a_live_attempt_alone(client: redis.Redis, tmp_path: Path) -> None:
    run_id, tasks = recorded_run(client, tmp_path, count=1)
    JobTracker(client).start(run_id, "j0", tasks[0], HOST, 0, started_at=1.0)
    running = read_status(client, run_id).jobs
    live = Liveness(leases={"rig-x": [make_token(HOST, tasks[0])]})
    assert settle(client, run_id, running, live, tmp_path) == []
    assert read_status(client, run_id).jobs[0].state is JobState.RUNNING


def test_one_lease_holder_at_a_time_and_a_dead_holder_is_freed(client: redis.Redis) -> None:
    slot = f"rig-lease-{next(_numbers)}"
    first = SlotLease(client, slot, HOST, "r.a.0")
    assert first.acquire()
    second = SlotLease(client, slot, "rig-y@box", "r.b.0")
    tries: list[int] = []
    assert second.acquire(give_up=lambda: tries.append(1) or len(tries) >= 2) is False
    first.release()
    assert second.acquire()
    second.release()
    # A lease left by a dead process of this same worker is broken at once.
    client.set(first.key, f"{HOST}/999999999/r.c.0", px=30_000)
    third = SlotLease(client, slot, HOST, "r.d.0")
    assert third.acquire(give_up=lambda: True)
    assert client.get(third.key).decode() == third.token
    third.release()
    assert client.get(third.key) is None


def test_presence_counts_only_recent_announcements(client: redis.Redis) -> None:
    node = f"rig-pres-{next(_numbers)}"
    since = time.time()
    mine = presence.Presence()
    mine.hostname, mine.nodes = f"{node}@box", [node]
    mine.client = lambda: client  # type: ignore[method-assign]
    mine.announce()
    assert presence.serving(client, [node, "rig-nobody"]) == {node: [f"{node}@box"]}
    assert presence.seen_since(client, [node], since) == {f"{node}@box"}
    client.zadd(presence.presence_key(node),
                {"old@box": time.time() - presence.PRESENCE_TTL_S - 1})
    assert presence.serving(client, [node]) == {node: [f"{node}@box"]}
    mine.withdraw()
    assert presence.serving(client, [node]) == {}


def test_the_retry_policy_backs_off_exponentially_with_jitter_and_a_cap() -> None:
    policy = Retries(retries=3, base_delay=2.0, max_delay=3.5)
    for _ in range(50):  # the jitter is random: look at many draws
        waits = [policy.after_failure(attempt) for attempt in (1, 2, 3)]
        assert 1.0 <= waits[0] <= 3.0  # 2 s x U(0.5, 1.5)
        assert 2.0 <= waits[1] <= 3.5  # 4 s x jitter, capped
        assert waits[2] == 3.5  # 8 s x at least 0.5 is over the cap
        uncapped = Retries(retries=3, base_delay=1.0, max_delay=1000.0).after_failure(3)
        assert uncapped is not None and 2.0 <= uncapped <= 6.0  # 1 s x 2^2 x jitter
    assert policy.after_failure(4) is None  # the last allowed attempt failed
    assert Retries(retries=0, base_delay=1.0).after_failure(1) is None
    assert Retries(retries=1, base_delay=0.0).after_failure(1) == 0.0
    assert Retries(retries=9, base_delay=100.0).after_failure(9) == MAX_BACKOFF_S


def test_progress_lines_say_each_state_of_an_attempt_once() -> None:
    import io

    from coordinator.progress import ProgressDisplay
    from coordinator.records import JobRecord, RunStatus
    from worker_tasks.tracking import RunState

    def snapshot(state: JobState, attempts: int) -> RunStatus:
        job = JobRecord(job_id="c1", node="rig-a", state=state, attempts=attempts,
                        duration_s=0.3 if state.is_final else None)
        return RunStatus(run_id="r", state=RunState.ACTIVE, output_dir="o", created_at=0.0,
                         jobs=[job])

    stream = io.StringIO()
    display = ProgressDisplay(stream=stream, live=False)
    # A re-read snapshot may replay an older state (running after finishing): said once.
    for state, attempts in [(JobState.QUEUED, 0), (JobState.RUNNING, 1), (JobState.FINISHING, 1),
                            (JobState.RUNNING, 1), (JobState.QUEUED, 1), (JobState.RUNNING, 2),
                            (JobState.SUCCEEDED, 2)]:
        display(snapshot(state, attempts))
    lines = [line.split(" ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == ["[rig-a] c1 running  (0/1)", "[rig-a] c1 queued  (0/1)",
                     "[rig-a] c1 running  (0/1)", "[rig-a] c1 succeeded in 0.3 s  (1/1)"]


def test_the_report_time_axis_ticks_at_round_steps() -> None:
    from coordinator.report import axis_ticks, render_svg, tick_label

    assert [tick_label(tick) for tick in axis_ticks(11.3)] == ["0", "2", "4", "6", "8", "10"]
    assert [tick_label(tick) for tick in axis_ticks(3.4)] == [
        "0", "0.5", "1", "1.5", "2", "2.5", "3"]
    assert axis_ticks(100.0) == [float(step) for step in range(0, 101, 10)]
    assert axis_ticks(0.0) == [0.0]
    summary = {"nodes": {"rig-a": {}}, "jobs": [{
        "job_id": "j", "node": "rig-a", "state": "succeeded", "attempt_history": [
            {"attempt": 1, "started_at": 100.0, "finished_at": 103.4, "exit_code": 0}]}]}
    labels = re.findall(r">([0-9.]+) s</text>", render_svg(summary))
    assert labels == ["0", "0.5", "1", "1.5", "2", "2.5", "3"], labels


def test_placement_policies_decide_one_job_at_a_time() -> None:
    jobs = [(f"j{i}", "rig-dead") for i in range(5)]
    assert placed(AsFiled(), jobs) == dict.fromkeys((job for job, _ in jobs), "rig-dead")
    assert placed(FirstFreeSlot(), jobs) == dict.fromkeys((job for job, _ in jobs), "any")
    # Least loaded counts what it places: rig-b's 2 waiting jobs are matched first.
    policy = LeastLoaded(["rig-a", "rig-b"], {"rig-b": 2})
    assert placed(policy, jobs) == {"j0": "rig-a", "j1": "rig-a", "j2": "rig-a",
                                    "j3": "rig-b", "j4": "rig-a"}
    assert policy.loads == {"rig-a": 4, "rig-b": 3}
    assert loads_of({"rig-a": 1}, {"rig-a": 1, "rig-c": 1}, ["rig-a", "rig-b"]) == \
        {"rig-a": 2, "rig-b": 0}
    with pytest.raises(ValueError, match="at least one target"):
        LeastLoaded([])
