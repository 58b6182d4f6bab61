"""Following a run to its end: read only what changed, survive broker trouble, settle records.

``RunFollower`` keeps a snapshot of every job, loaded once, then brought up to
date from the run's change stream (one ``XREAD`` per poll) and checked
against the per-state counters the transitions keep; it reloads in full only
when the two disagree (the stream was trimmed). ``follow`` is the wait loop
around it: it reconnects with backoff when Redis goes away (for up to
``SC_RECONNECT_TIMEOUT`` seconds, saying so), says when a run's records
vanished, settles stuck records (``reconcile``), and with ``failover`` moves
the queued jobs of a node that has had no live worker for that long.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from coordinator.broker import redact
from coordinator.cluster_view import ClusterView
from coordinator.errors import BrokerUnreachableError, RunNotFoundError, WaitTimeoutError
from coordinator.reconcile import find_lost, move_jobs, settle
from coordinator.records import (
    FOLLOW_FIELDS,
    JobRecord,
    RunStatus,
    read_counts,
    read_info,
    read_records,
    read_status,
    status_from,
)
from coordinator.submission import republish
from worker_tasks.spec import is_floating, queue_for
from worker_tasks.tracking import ACTIVE, LOST_ONLY, JobEvent, JobState, events_key, run_key

# How often the follower reads the stream and counters (seconds).
POLL_INTERVAL_S = 0.5
# Stream entries read per poll at most (the rest come on the next poll).
EVENTS_PER_POLL = 50_000
# Without progress for this long, records are reconciled with workers, files and messages.
RECONCILE_AFTER_S = float(os.environ.get("SC_RECONCILE_AFTER", "10"))
# How long a follower keeps reconnecting to a Redis that went away (seconds).
RECONNECT_TIMEOUT_S = float(os.environ.get("SC_RECONNECT_TIMEOUT", "300"))
# Liveness of nodes is checked this often when failover is on (seconds).
FAILOVER_CHECK_S = 5.0

Notice = Callable[[str], None]


class RunVanishedError(RunNotFoundError):
    """The run's records disappeared while it was followed (Redis lost its data)."""


# Stream reads a poll may make to catch up with the counters before it reloads everything.
CATCH_UP_READS = 5


class RunFollower:
    """A run's snapshot, kept current from its change stream.

    Parameters:
        client: the tracking Redis.
        run_id: the run to follow.
    """

    def __init__(self, client: redis.Redis, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.jobs: dict[str, JobRecord] = {}
        self.info: dict[str, object] = {}
        self.last_id: bytes | str = b"0-0"
        self.loaded = False

    def load(self) -> None:
        """Everything, once: the stream position first, so no change is missed."""
        newest = self.client.xrevrange(events_key(self.run_id), count=1)
        self.last_id = newest[0][0] if newest else b"0-0"
        status = read_status(self.client, self.run_id, FOLLOW_FIELDS)
        self.info = status.info
        self.jobs = {job.job_id: job for job in status.jobs}
        self.loaded = True

    def poll(self, block: float | None = None) -> bool:
        """Apply what changed since the last poll; True if anything did.

        ``block``: wait up to that many seconds for a change (a blocking stream read
        that returns the moment a job moves).
        """
        if not self.loaded:
            self.load()
            return True
        changed = self.read_events(block)
        state = self.client.hget(run_key(self.run_id), "state")
        if state is None:
            read_info(self.client, self.run_id)  # raises RunNotFoundError
        elif json.loads(state) != self.info.get("state"):
            self.info = {**self.info, "state": json.loads(state)}
            changed = True
        for _ in range(CATCH_UP_READS):
            if read_counts(self.client, self.run_id) == self.counts():
                return changed
            if not self.read_events():  # counts moved on and no event says why:
                break                   # the stream was trimmed past us
            changed = True
        else:
            return changed  # a busy run: the next poll goes on reading
        self.load()  # read everything again (rare: a re-read replays newer events over it)
        return True

    def read_events(self, block: float | None = None) -> bool:
        reply = self.client.xread({events_key(self.run_id): self.last_id}, count=EVENTS_PER_POLL,
                                  block=None if not block else max(1, int(block * 1000)))
        changed = False
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last_id = entry_id
                changed |= self.apply(fields)
        return changed

    def apply(self, fields: dict[bytes, bytes]) -> bool:
        event = JobEvent.from_stream(fields)
        job = self.jobs.get(event.job)
        if job is None:
            return False
        updates: dict[str, object] = {"state": event.state}
        for name in ("attempts", "host", "duration_s", "error", "task_id", "node"):
            if getattr(event, name) is not None:
                updates[name] = getattr(event, name)
        self.jobs[job.job_id] = dataclasses.replace(job, **updates)  # type: ignore[arg-type]
        return True

    def counts(self) -> Counter[JobState]:
        return Counter(job.state for job in self.jobs.values())

    def status(self) -> RunStatus:
        return status_from(self.run_id, self.info, list(self.jobs.values()))


@dataclass
class FollowOptions:
    """How ``follow`` behaves.

    Parameters:
        timeout: give up after this many seconds (``WaitTimeoutError``).
        poll_interval: seconds between polls.
        workdir: where ``.done`` files are visible (shared storage), for settling
            (default: where the run's workers wrote, ``RunStatus.files_dir``).
        failover: move a node's queued jobs after it has had no live worker this long.
        reconnect_timeout: keep reconnecting to Redis this long before giving up.
        republish_lost: publish a job found lost again, once (``wait``); ``status`` only marks.
        notice: where one-line notices go (reconnecting, settled, lost, moved).
    """

    timeout: float | None = None
    poll_interval: float = POLL_INTERVAL_S
    workdir: Path | None = None
    failover: float | None = None
    reconnect_timeout: float = RECONNECT_TIMEOUT_S
    republish_lost: bool = True
    notice: Notice = field(default=lambda line: None)


def follow(client: redis.Redis, app: Celery, broker: redis.Redis, run_id: str,
           on_progress: Callable[[RunStatus], None] | None,
           options: FollowOptions) -> RunStatus:
    """Block until every job of the run is final; see the module docstring."""
    follower = RunFollower(client, run_id)
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    settler = Settler(client, app, broker, run_id, options)
    first = True
    while True:
        try:
            changed = follower.poll(None if first else options.poll_interval)
            first = False
        except redis.ConnectionError as err:
            reconnect(client, err, options)
            if client.exists(run_key(run_id)) == 0:
                raise vanished(run_id, follower) from None
            continue
        except RunNotFoundError:
            if follower.loaded:
                raise vanished(run_id, follower) from None
            raise
        status = follower.status()
        if changed and on_progress is not None:
            on_progress(status)
        if status.finished:
            return read_status(client, run_id)  # once, in full, for the caller
        if changed:
            settler.progress()
        else:
            try:
                settler.maybe_settle(status)
            except redis.ConnectionError as err:
                reconnect(client, err, options)
        if deadline is not None and time.monotonic() >= deadline:
            raise WaitTimeoutError(
                f"run {run_id}: not finished after {options.timeout:g} s ({status.line()})")


def reconnect(client: redis.Redis, err: Exception, options: FollowOptions) -> None:
    """Retry Redis with backoff for ``reconnect_timeout`` s; ``BrokerUnreachableError`` after."""
    kwargs = client.connection_pool.connection_kwargs
    url = redact(f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}")
    options.notice(f"lost the connection to Redis ({err}); reconnecting for up to "
                   f"{options.reconnect_timeout:g} s (SC_RECONNECT_TIMEOUT)")
    started = time.monotonic()
    delay = 0.5
    while time.monotonic() - started < options.reconnect_timeout:
        time.sleep(min(delay, max(0.0, options.reconnect_timeout - (time.monotonic() - started))))
        try:
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError):
            delay = min(delay * 2, 10.0)
            continue
        options.notice(f"reconnected to Redis after {time.monotonic() - started:.1f} s")
        return
    raise BrokerUnreachableError(f"Redis at {url} did not come back within "
                                 f"{options.reconnect_timeout:g} s: {err}")


def listing(job_ids: list[str], most: int = 10) -> str:
    """Job ids for a one-line notice: the first ``most``, then an ellipsis."""
    return ", ".join(job_ids[:most]) + (" ..." if len(job_ids) > most else "")


def vanished(run_id: str, follower: RunFollower) -> RunVanishedError:
    info = follower.info
    jobs_file = info.get("jobs_file") or "JOBS_FILE"
    output_dir = info.get("output_dir") or "OUTPUT_DIR"
    return RunVanishedError(
        f"run {run_id}: its records vanished from Redis while it was being followed (Redis "
        f"restarted without persistence, or they were deleted); jobs whose .done exists are "
        f"done. Recover the rest with: coordinator recover --jobs-file {jobs_file} "
        f"--output-dir {output_dir}")


class Settler:
    """What ``follow`` does when nothing moves: settle records, find lost jobs, fail over."""

    def __init__(self, client: redis.Redis, app: Celery, broker: redis.Redis, run_id: str,
                 options: FollowOptions) -> None:
        self.client = client
        self.app = app
        self.broker = broker
        self.run_id = run_id
        self.options = options
        self.quiet_since = time.monotonic()
        self.last_settle = 0.0
        self.last_failover_check = 0.0
        self.unserved_since: dict[str, float] = {}
        self.published_again: set[str] = set()

    def progress(self) -> None:
        self.quiet_since = time.monotonic()

    def maybe_settle(self, status: RunStatus) -> None:
        moment = time.monotonic()
        if self.options.failover is not None and moment - self.last_failover_check >= \
                FAILOVER_CHECK_S:
            self.last_failover_check = moment
            self.failover(status)
        if moment - self.quiet_since < RECONCILE_AFTER_S or moment - self.last_settle < \
                RECONCILE_AFTER_S:
            return
        self.last_settle = moment
        self.settle(status)

    def settle(self, status: RunStatus) -> None:
        """Settle the running records, then look for lost jobs (see ``reconcile``).

        ``status`` may be a light snapshot: only the running jobs' full records (their
        ``.done`` paths) are read.
        """
        waiting_ids = [job.job_id for job in status.jobs if not job.state.is_final]
        if not waiting_ids:
            return
        running_ids = [job.job_id for job in status.jobs
                       if job.state in (JobState.RUNNING, JobState.FINISHING)]
        running = read_records(self.client, self.run_id, running_ids)
        live = ClusterView(self.client, self.app).liveness(
            {job.node for job in status.jobs if not job.state.is_final})
        settled = settle(self.client, self.run_id, running, live,
                         self.options.workdir or status.files_dir(), self.app)
        for line in settled:
            self.options.notice(line)
        fresh = ([job for job in status.jobs if not job.state.is_final] if not settled
                 else read_records(self.client, self.run_id, waiting_ids, FOLLOW_FIELDS))
        lost = find_lost(self.app, self.client, self.broker, self.run_id, fresh, live)
        if lost:
            self.publish_again(lost)

    def publish_again(self, lost: list[str]) -> None:
        """Publish lost jobs again, once each; a job lost a second time stays lost.

        A broker that crashes while handing a message to a worker loses it for good (kombu
        pops it, then records it as unacknowledged: two steps), so a follower that finds a
        lost job publishes it again rather than end the run short. Its old message, if it
        ever turns up, is stale and dropped; the node lease keeps any two from overlapping.
        """
        again = [job_id for job_id in lost if job_id not in self.published_again
                 and self.options.republish_lost]
        self.published_again.update(again)
        published = republish(self.client, self.app, self.run_id, again, LOST_ONLY,
                              note="its message vanished; published again by wait")
        if published:
            self.options.notice(f"{len(published)} jobs lost (their messages are gone and no "
                                f"worker runs them): {listing(published)}; published again")
        kept = [job_id for job_id in lost if job_id not in published]
        if kept:
            self.options.notice(f"{len(kept)} jobs lost (their messages are gone and no worker "
                                f"runs them): {listing(kept)}; coordinator retry --lost "
                                f"{self.run_id} republishes them")

    def failover(self, status: RunStatus) -> None:
        assert self.options.failover is not None
        # Floating jobs wait on no node ("any"): any live worker takes them.
        waiting_nodes = {job.node for job in status.jobs
                         if not job.state.is_final and not is_floating(job.node)}
        view = ClusterView(self.client, self.app)
        served = view.serving({*waiting_nodes, *status.info.get("nodes", [])})
        moment = time.monotonic()
        for node in waiting_nodes:
            if node in served:
                self.unserved_since.pop(node, None)
            else:
                self.unserved_since.setdefault(node, moment)
        dead = [node for node, since in self.unserved_since.items()
                if moment - since >= self.options.failover and node in waiting_nodes]
        targets = sorted(node for node in served if node not in dead and not is_floating(node))
        if not dead or not targets:
            return
        records = read_status(self.client, self.run_id, FOLLOW_FIELDS).jobs
        live = view.liveness(waiting_nodes)
        # What each target has to do: its queue and its running job. Every move adds to it,
        # so moved jobs spread over the least loaded nodes, not onto the first by name.
        running = Counter(job.node for job in records if job.state in ACTIVE)
        loads = {node: int(self.broker.llen(queue_for(node))) + running[node]
                 for node in targets}
        for node in dead:
            jobs = [job for job in records if job.node == node and not job.state.is_final]
            moved = move_jobs(self.client, self.app, self.run_id, jobs, targets, live, loads,
                              self.broker)
            if moved:
                where = ", ".join(f"{target} ({len(ids)})" for target, ids in moved.items())
                count = sum(map(len, moved.values()))
                self.options.notice(f"failover: node {node} has had no worker for "
                                    f"{self.options.failover:g} s; moved {count} queued jobs "
                                    f"to {where}")
            self.unserved_since.pop(node, None)
