"""Following a run to its end: read only what changed, survive broker trouble, report.

``RunFollower`` keeps a snapshot of every job, loaded once, then brought up to
date from the run's change stream (one ``XREAD`` per poll) and checked
against the per-state counters the transitions keep; it reloads in full only
when the two disagree (the stream was trimmed). ``follow`` is the wait loop
around it: it reconnects with backoff when Redis goes away (for up to
``SC_RECONNECT_TIMEOUT`` seconds, saying so), says when a run's records
vanished, and hands what it learns to the scheduler (``coordinator.scheduler``), which
makes every decision about the live run. Following decides nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
from kombu.exceptions import OperationalError

from coordinator.broker import redact
from coordinator.errors import (
    BrokerUnreachableError,
    NoWorkerError,
    RunNotFoundError,
    WaitTimeoutError,
)
from coordinator.records import (
    FOLLOW_FIELDS,
    JobRecord,
    RunStatus,
    read_counts,
    read_info,
    read_status,
    status_from,
)
from worker_tasks.presence import serving
from worker_tasks.tracking import (
    JobEvent,
    JobState,
    counts_key,
    counts_of,
    events_key,
    run_key,
)

if TYPE_CHECKING:
    from coordinator.scheduler import Scheduler

# How often the follower reads the stream and counters (seconds).
POLL_INTERVAL_S = 0.5
# Stream entries read per poll at most (the rest come on the next poll).
EVENTS_PER_POLL = 50_000
# Once a blocking read wakes on a change, how long the follower reads on before it reports
# (seconds). A job's end and the next one's start come as a burst of transitions, on
# several slots at once: read as one, they cost the head one poll instead of one each, and
# its reads stay off the CPU the workers need for them (a head on a machine it shares with
# workers, as under `coordinator local`). Not once the run is over: its end is told at once.
BURST_S = 0.02
# How long a follower keeps reconnecting to a Redis that went away (seconds).
RECONNECT_TIMEOUT_S = float(os.environ.get("SC_RECONNECT_TIMEOUT", "300"))
# How often a follower looks whether any worker serves the run's waiting jobs (seconds).
SERVED_CHECK_S = 2.0

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
        that returns the moment a job moves), then read on for ``BURST_S``.
        """
        if not self.loaded:
            self.load()
            return True
        changed = self.read_events(block)
        if changed and block and not self.over():
            time.sleep(BURST_S)  # the rest of the burst, read with it
            self.read_events()
        reads = self.client.pipeline(transaction=False)  # one round trip for both
        reads.hget(run_key(self.run_id), "state")
        reads.hgetall(counts_key(self.run_id))
        state, raw_counts = reads.execute()
        if state is None:
            read_info(self.client, self.run_id)  # raises RunNotFoundError
        elif json.loads(state) != self.info.get("state"):
            self.info = {**self.info, "state": json.loads(state)}
            changed = True
        counts = counts_of(raw_counts)
        for _ in range(CATCH_UP_READS):
            if counts == self.counts():
                return changed
            if not self.read_events():  # counts moved on and no event says why:
                break                   # the stream was trimmed past us
            changed = True
            counts = read_counts(self.client, self.run_id)
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
        job = self.jobs.get(event.job) if event is not None else None
        if event is None or job is None:  # a hand-made entry, or one of no job of the run
            return False
        updates: dict[str, object] = {"state": event.state}
        for name in ("attempts", "host", "duration_s", "error", "task_id", "node"):
            if getattr(event, name) is not None:
                updates[name] = getattr(event, name)
        self.jobs[job.job_id] = dataclasses.replace(job, **updates)  # type: ignore[arg-type]
        return True

    def counts(self) -> Counter[JobState]:
        return Counter(job.state for job in self.jobs.values())

    def over(self) -> bool:
        """Whether every job is final, as far as the stream has told."""
        return all(job.state.is_final for job in self.jobs.values())

    def status(self) -> RunStatus:
        return status_from(self.run_id, self.info, list(self.jobs.values()))


@dataclass
class FollowOptions:
    """How ``follow`` behaves.

    Parameters:
        timeout: give up after this many seconds (``WaitTimeoutError``).
        poll_interval: seconds between polls.
        reconnect_timeout: keep reconnecting to Redis this long before giving up.
        no_worker_timeout: give up once no worker has served any of the run's waiting jobs
            for this many seconds, nothing running (``NoWorkerError``); None: wait for ever.
        notice: where one-line notices go (reconnecting, reconnected).
    """

    timeout: float | None = None
    poll_interval: float = POLL_INTERVAL_S
    reconnect_timeout: float = RECONNECT_TIMEOUT_S
    no_worker_timeout: float | None = None
    notice: Notice = field(default=lambda line: None)


class Unserved:
    """How long a run has waited with nothing running and no worker serving its waiting jobs
    (the presence registry), for ``no_worker_timeout``.

    Parameters:
        client: the tracking Redis (presence).
        bound: seconds without a worker before ``NoWorkerError``.
    """

    def __init__(self, client: redis.Redis, bound: float) -> None:
        self.client = client
        self.bound = bound
        self.since: float | None = None
        self.last_check = 0.0

    def after_poll(self, status: RunStatus, changed: bool) -> None:
        moment = time.monotonic()
        if changed:
            self.since = None  # something moved: a worker is there
            return
        if moment - self.last_check < SERVED_CHECK_S:
            return
        self.last_check = moment
        waiting = sorted({job.node for job in status.jobs if job.state is JobState.QUEUED})
        running = any(job.state in (JobState.RUNNING, JobState.FINISHING) for job in status.jobs)
        if running or not waiting or serving(self.client, waiting):
            self.since = None
            return
        self.since = moment if self.since is None else self.since
        if moment - self.since >= self.bound:
            shown = ", ".join(f"node.{node}" for node in waiting[:5]) + (
                " ..." if len(waiting) > 5 else "")
            raise NoWorkerError(
                f"run {status.run_id}: no worker has served its {status.total - status.done} "
                f"waiting jobs ({shown}) for {self.bound:g} s; the run goes on: start a worker "
                f"(coordinator worker --node NODE, or coordinator cluster up), or check that "
                f"this is the broker you meant (--broker URL / $SC_BROKER_URL)")


def follow(client: redis.Redis, run_id: str, on_progress: Callable[[RunStatus], None] | None,
           options: FollowOptions, scheduler: Scheduler | None = None) -> RunStatus:
    """Block until every job of the run is final; see the module docstring.

    ``scheduler`` hears of each poll (``after_progress`` or ``while_quiet``); without one,
    the run is only watched.
    """
    follower = RunFollower(client, run_id)
    deadline = None if options.timeout is None else time.monotonic() + options.timeout
    unserved = (Unserved(client, options.no_worker_timeout)
                if options.no_worker_timeout else None)
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
        if unserved is not None:
            unserved.after_poll(status, changed)
        if scheduler is not None:
            try:
                if changed:
                    scheduler.after_progress(status)
                else:
                    scheduler.while_quiet(status)
            except redis.ConnectionError as err:
                reconnect(client, err, options)
            except OperationalError as err:  # kombu's: publishing or asking the workers
                options.notice(f"the broker did not answer the scheduler ({err}); it tries "
                               f"again on a later poll")
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


def vanished(run_id: str, follower: RunFollower) -> RunVanishedError:
    info = follower.info
    jobs_file = info.get("jobs_file") or "JOBS_FILE"
    output_dir = info.get("output_dir") or "OUTPUT_DIR"
    return RunVanishedError(
        f"run {run_id}: its records vanished from Redis while it was being followed (Redis "
        f"restarted without persistence, or they were deleted); jobs whose .done exists are "
        f"done. Recover the rest with: coordinator recover --jobs-file {jobs_file} "
        f"--output-dir {output_dir}")
