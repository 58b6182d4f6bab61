"""Flower's view of the runs that started before it: their jobs, told again from the records.

Flower knows a job only from the task events it receives while it runs, and events are not
stored. ``coordinator flower`` therefore starts this module beside Flower: it waits until a
new consumer (Flower's) is bound to the events exchange on the broker, then sends (three
times over a few seconds: kombu binds before it subscribes), for every job of the runs Redis
still holds, the events its attempts would have sent (received, started, and how it ended),
each with its own time and its worker's name. A job still running goes on to send its live
events, which Flower merges as usual.

    python -m coordinator.flower_replay BROKER_URL LISTENERS_BEFORE MAX_TASKS
"""

from __future__ import annotations

import sys
import time
from typing import Any

import redis

from coordinator.broker import connect_tracking, event_listeners, publisher
from coordinator.records import JobRecord, read_status, recent_run_ids
from worker_tasks.connections import redis_client
from worker_tasks.tracking import JobState, error_line

# How long the replay waits for Flower to listen (seconds), and how often it looks.
LISTEN_TIMEOUT_S = 60.0
LISTEN_POLL_S = 0.2
# The replay is sent this long after Flower binds, then again after each further pause.
REPLAY_PAUSES_S = (0.5, 2.0, 5.0)


def wait_for_listener(client: redis.Redis, before: set[bytes],
                      timeout: float = LISTEN_TIMEOUT_S) -> bool:
    """True once a consumer that was not there ``before`` is bound to the events exchange."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event_listeners(client) - before:
            return True
        time.sleep(LISTEN_POLL_S)
    return False


def job_events(job: JobRecord, run_id: str, before: float = float("inf")
               ) -> list[tuple[str, dict[str, Any]]]:
    """The events a job's last attempt sent before ``before``, as (type, fields), oldest
    first (what came after reached Flower live)."""
    if not job.task_id:
        return []
    name = f"job {job.job_id} on {job.node} (run {run_id})"
    base = {"uuid": job.task_id}
    sent = job.queued_at or job.started_at
    events: list[tuple[str, dict[str, Any]]] = []
    if sent is not None:
        events.append(("task-sent", {**base, "name": name, "timestamp": sent}))
    if job.started_at is not None:
        events.append(("task-received", {**base, "name": name, "timestamp": job.started_at}))
        events.append(("task-started", {**base, "timestamp": job.started_at}))
    end = job.finished_at or job.started_at or sent
    if job.state in (JobState.SUCCEEDED, JobState.SKIPPED):
        events.append(("task-succeeded", {**base, "timestamp": end,
                                          "runtime": job.duration_s or 0.0,
                                          "result": repr({"state": str(job.state)})}))
    elif job.state in (JobState.FAILED, JobState.LOST):
        # As the worker tells it: the error in one line, the whole of it as the traceback.
        events.append(("task-failed", {**base, "timestamp": end,
                                       "exception": error_line(job.error),
                                       "traceback": job.error or "",
                                       "runtime": job.duration_s or 0.0}))
    elif job.state is JobState.CANCELLED:
        events.append(("task-revoked", {**base, "timestamp": end, "terminated": False,
                                        "signum": None, "expired": False,
                                        "exception": job.error or "cancelled"}))
    return [(kind, fields) for kind, fields in events if fields["timestamp"] < before]


def replay(broker_url: str, max_tasks: int, before: float = float("inf")) -> int:
    """Send the recorded jobs' events from before ``before`` (at most ``max_tasks`` jobs,
    newest runs first); returns how many jobs were told."""
    app = publisher(broker_url)
    tracking = connect_tracking(None, broker_url)
    told = 0
    with app.connection_for_write() as connection:
        dispatchers: dict[str, Any] = {}
        for run_id in recent_run_ids(tracking, max_tasks):
            if told >= max_tasks:
                break
            for job in read_status(tracking, run_id).jobs[:max_tasks - told]:
                host = job.host or f"{job.node}@replayed"
                if host not in dispatchers:
                    dispatchers[host] = app.events.Dispatcher(connection, hostname=host,
                                                              enabled=True)
                for kind, fields in job_events(job, run_id, before):
                    dispatchers[host].send(kind, **fields)
                told += 1
    return told


def main(argv: list[str]) -> int:
    broker_url, max_tasks = argv[0], int(argv[2])
    before = {bytes.fromhex(item) for item in argv[1].split(",") if item}
    if not wait_for_listener(redis_client(broker_url), before):
        return 1
    bound = time.time()  # what ends from now on reaches Flower live: not told again
    # Bound, then subscribed a moment later: events sent in between reach nobody. Flower
    # merges a job's events by its id and time, so telling it again is harmless.
    for pause in REPLAY_PAUSES_S:
        time.sleep(pause)
        replay(broker_url, max_tasks, bound)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
