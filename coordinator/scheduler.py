"""What the head decides while a run is under way: the scheduler.

A run is correct without anyone watching it: workers pull jobs, every transition is
atomic, and records converge to the ``.done`` files. What the head learns while it
follows a run it may act on, and every such decision is made here, nowhere else:

* **settle**: a record that disagrees with a ``.done`` file or with a dead worker is put
  right (``coordinator.reconcile`` does the reading and the transitions), and the message
  of a job whose worker is gone goes back to its queue rather than wait for the visibility
  timeout (the records of dead workers while jobs move, everything once the run is quiet);
* **publish again**: a job whose message vanished (a broker restarted empty) is published
  once more, once;
* **fail over**: the queued jobs of a node that has had no live worker for ``failover``
  seconds move to the live nodes, where the placement policy puts them
  (``coordinator.placement``); ``move_off`` does the same when a user asks (``move``);
* **place the tail**: the last floating jobs go to the slots that finish them first; one
  placed on a slot whose worker is gone since goes back to the shared queue;
* **speculate**: a straggling floating job gets a backup copy on an idle slot that would
  finish it sooner (``worker_tasks.copies``; the first execution to succeed wins).

The follower (``coordinator.follow``) calls the hooks below, named for the moment they run;
it only reads and reports.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from coordinator.cluster_view import ClusterView, Liveness
from coordinator.placement import (
    EarliestFinish,
    LeastLoaded,
    RunningJob,
    backup_copies,
    copy_budget,
    loads_of,
    time_left,
)
from coordinator.reconcile import (
    find_lost,
    float_again,
    move_jobs,
    place_floating,
    return_dead_messages,
    settle,
)
from coordinator.records import FOLLOW_FIELDS, JobRecord, RunStatus, read_records, read_status
from coordinator.submission import publish_copy, republish
from worker_tasks.dependencies import Dependencies
from worker_tasks.spec import FLOATING_NODE, is_floating, queue_for, slot_of_worker
from worker_tasks.speeds import SlotSpeeds
from worker_tasks.tracking import ACTIVE, LOST_ONLY, CopyState, JobState, lease_key

# The tail of a run begins when no more floating jobs are queued than this per live slot.
TAIL_PER_SLOT = 2
# Without progress for this long, records are reconciled with workers, files and messages;
# while jobs move, the running ones are still settled this often (a worker killed mid-job is
# seen dead without waiting for the run to go quiet).
RECONCILE_AFTER_S = float(os.environ.get("SC_RECONCILE_AFTER", "10"))
# Liveness of nodes is checked this often when failover is on (seconds).
FAILOVER_CHECK_S = 5.0
# Stragglers are looked for this often while no floating job is queued (seconds).
SPECULATION_CHECK_S = 0.5

Notice = Callable[[str], None]


@dataclass
class SchedulerOptions:
    """What the scheduler may do.

    Parameters:
        workdir: where ``.done`` files are visible (shared storage), for settling
            (default: where the run's workers wrote, ``RunStatus.files_dir``).
        failover: move a node's queued jobs after it has had no live worker this long.
        republish_lost: publish a job found lost again, once (``wait``); ``status`` only marks.
        place_tail: give the last floating jobs to the slots that finish them first
            (``place_tail``).
        speculate: start backup copies of stragglers on idle slots (``speculate``).
        notice: where one-line notices of each decision go (settled, lost, moved).
    """

    workdir: Path | None = None
    failover: float | None = None
    republish_lost: bool = True
    place_tail: bool = True
    speculate: bool = True
    notice: Notice = field(default=lambda line: None)


def cost_of(job: JobRecord) -> float:
    """A job's cost hint from its message (1 without one)."""
    return float(job.cost or 1.0)


def listing(job_ids: list[str], most: int = 10) -> str:
    """Job ids for a one-line notice: the first ``most``, then an ellipsis."""
    return ", ".join(job_ids[:most]) + (" ..." if len(job_ids) > most else "")


def target_loads(broker: redis.Redis, records: Sequence[JobRecord],
                 targets: Sequence[str]) -> dict[str, int]:
    """Work waiting per target node: its queue in the broker plus this run's running jobs."""
    running = Counter(job.node for job in records if job.state in ACTIVE)
    queued = {node: int(broker.llen(queue_for(node))) for node in targets}
    return loads_of(queued, running, targets)


def move_off(client: redis.Redis, app: Celery, broker: redis.Redis, run_id: str,
             source: str, targets: Sequence[str], live: Liveness) -> dict[str, list[str]]:
    """Move the queued (and abandoned) jobs of node ``source`` to the least loaded of
    ``targets``; pinned jobs stay. Returns target -> job ids."""
    records = read_status(client, run_id, FOLLOW_FIELDS).jobs
    jobs = [job for job in records if job.node == source]
    placement = LeastLoaded(targets, target_loads(broker, records, targets))
    return move_jobs(client, app, run_id, jobs, placement, live, broker)


class Scheduler:
    """The head's decisions about one live run, each at the moment it is due.

    Parameters:
        client: the tracking Redis.
        app: a Celery app on the broker (publishing, asking workers).
        broker: a client on the broker's Redis (queues, for lost messages and loads).
        run_id: the run.
        options: what it may do (``SchedulerOptions``).
    """

    def __init__(self, client: redis.Redis, app: Celery, broker: redis.Redis, run_id: str,
                 options: SchedulerOptions) -> None:
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
        self.tail_placed = False
        self.last_tail_check = 0.0
        self.last_speculation = 0.0

    # -- hooks, called by the follower ------------------------------------------------------

    def after_progress(self, status: RunStatus) -> None:
        """A job moved: the run is not stuck, so the search for lost jobs waits, but the
        running records are settled when due (a worker that died mid-job while others
        work); the tail may have come."""
        moment = self.quiet_since = time.monotonic()
        if self.options.place_tail and not self.tail_placed:
            self.place_tail(status)
        self.rescue_tail(status)
        if self.options.speculate:
            self.speculate(status)
        if moment - self.last_settle >= RECONCILE_AFTER_S:
            self.last_settle = moment
            self.settle_running(status, dead_only=True)

    def while_quiet(self, status: RunStatus) -> None:
        """Nothing moved since the last poll: fail over when due, settle when quiet long
        enough. ``status`` may be a light snapshot."""
        moment = time.monotonic()
        self.rescue_tail(status)
        if self.options.speculate:
            self.speculate(status)
        if self.options.failover is not None and moment - self.last_failover_check >= \
                FAILOVER_CHECK_S:
            self.last_failover_check = moment
            self.failover(status)
        if moment - self.quiet_since < RECONCILE_AFTER_S or moment - self.last_settle < \
                RECONCILE_AFTER_S:
            return
        self.last_settle = moment
        self.settle(status)

    # -- decisions --------------------------------------------------------------------------

    def settle(self, status: RunStatus) -> None:
        """Settle the running records, then look for lost jobs (see ``reconcile``).

        ``status`` may be a light snapshot: only the running jobs' full records (their
        ``.done`` paths) are read.
        """
        if not any(not job.state.is_final for job in status.jobs):
            return
        held = [job.job_id for job in status.jobs if job.state is JobState.HELD]
        if held:
            self.settle_held(held)
        fresh, live = self.settle_running(status)
        lost = find_lost(self.app, self.client, self.broker, self.run_id, fresh, live)
        if lost:
            self.publish_again(lost)

    def settle_running(self, status: RunStatus, dead_only: bool = False
                       ) -> tuple[list[JobRecord], Liveness]:
        """Settle the running records by their ``.done`` and their worker (an attempt whose
        worker died is requeued), and return the messages such workers left unacknowledged
        once it is safe; the jobs not final as they now are (light records), and who is
        alive. ``dead_only`` (while jobs move): only the records whose worker is gone, so
        as not to race a live worker between its ``.done`` and its last write."""
        waiting_ids = [job.job_id for job in status.jobs if not job.state.is_final]
        running_ids = [job.job_id for job in status.jobs
                       if job.state in (JobState.RUNNING, JobState.FINISHING)]
        running = read_records(self.client, self.run_id, running_ids)
        # The running records' own nodes too: a light snapshot's may lag (a floating job's).
        live = ClusterView(self.client, self.app).liveness(
            {job.node for job in status.jobs if not job.state.is_final}
            | {job.node for job in running})
        if dead_only:
            running = [job for job in running if not live.running(job)]
        settled = settle(self.client, self.run_id, running, live,
                         self.options.workdir or status.files_dir(), self.app)
        for line in settled:
            self.options.notice(line)
        fresh = ([job for job in status.jobs if not job.state.is_final] if not settled
                 else read_records(self.client, self.run_id, waiting_ids, FOLLOW_FIELDS))
        for line in return_dead_messages(self.client, self.app, fresh):
            self.options.notice(line)
        return fresh, live

    def place_tail(self, status: RunStatus) -> None:
        """Once the floating jobs still queued are few (``TAIL_PER_SLOT`` per live slot),
        give each to the slot that would finish it first, by the slots' learned speeds and
        what their running jobs have left (``EarliestFinish``): a slow slot then stays idle
        rather than take a job a fast one would end sooner. Once per run; a run nobody
        follows keeps first-free placement."""
        queued = [job for job in status.jobs if job.floating and job.state is JobState.QUEUED]
        if not queued or status.info.get("per_gpu"):
            return
        slots = self.floating_slots()
        if not slots or len(queued) > TAIL_PER_SLOT * len(slots):
            return
        self.tail_placed = True
        tail = {job.job_id for job in queued}
        records = read_records(self.client, self.run_id,
                               [job.job_id for job in status.jobs
                                if job.job_id in tail or job.state in ACTIVE])
        scripts = {job.script for job in records if job.job_id in tail}
        if len(scripts) != 1:
            return  # speeds are per script: a mixed tail keeps first-free placement
        speeds = SlotSpeeds(self.client).of(scripts.pop())
        if not set(slots) <= set(speeds):
            return  # a slot with no estimate yet: nothing to place by
        per_unit = {slot: speeds[slot].seconds_per_unit for slot in slots}
        costs = {job.job_id: cost_of(job) for job in records}
        moment = time.time()
        free_at = dict.fromkeys(slots, 0.0)
        for job in records:
            if job.state in ACTIVE and job.node in free_at and job.started_at:
                # A job past its estimate is a straggler's: its slot is not free soon.
                left = time_left(RunningJob(job.job_id, job.node, costs[job.job_id],
                                            moment - job.started_at), per_unit)
                free_at[job.node] = max(free_at[job.node], left, 0.0)
        placed_on = place_floating(self.client, self.app, self.broker, self.run_id,
                                   [job for job in records if job.state is JobState.QUEUED],
                                   EarliestFinish(free_at, per_unit, costs))
        if placed_on:
            where = ", ".join(f"{slot} ({len(ids)})" for slot, ids in sorted(placed_on.items()))
            self.options.notice(f"tail: placed the last {sum(map(len, placed_on.values()))} "
                                f"floating jobs where each finishes first: {where}")

    def rescue_tail(self, status: RunStatus) -> None:
        """A floating job the tail placed on a slot whose worker is gone since goes back to
        the shared queue (``float_again``), where the first free slot takes it. Checked
        every ``FAILOVER_CHECK_S`` once the tail is placed."""
        moment = time.monotonic()
        if not self.tail_placed or moment - self.last_tail_check < FAILOVER_CHECK_S:
            return
        self.last_tail_check = moment
        placed_jobs = [job for job in status.jobs if job.floating and job.state is
                       JobState.QUEUED and not is_floating(job.node)]
        if not placed_jobs:
            return
        floated = float_again(self.client, self.app, self.broker, self.run_id, placed_jobs,
                              self.floating_slots())
        for slot, job_ids in sorted(floated.items()):
            self.options.notice(f"tail: no worker serves {slot} now; {len(job_ids)} floating "
                                f"jobs placed there go back to the shared queue: "
                                f"{listing(job_ids)}")

    def speculate(self, status: RunStatus) -> None:
        """Once no floating job is queued, give a straggler a backup copy on an idle slot that
        would finish it ``COPY_MARGIN`` times sooner (``backup_copies``): one copy per job at
        most, ``COPY_SHARE`` of the slots at most at once. Checked every
        ``SPECULATION_CHECK_S``; the copies live in the records, so a head started again
        never copies a job twice."""
        moment = time.monotonic()
        if moment - self.last_speculation < SPECULATION_CHECK_S or status.info.get("per_gpu"):
            return
        self.last_speculation = moment
        if any(job.floating and job.state is JobState.QUEUED for job in status.jobs):
            return
        # Full records: a follower's snapshot knows neither start times nor copies.
        records = read_records(self.client, self.run_id, [
            job.job_id for job in status.jobs if job.floating and job.state in ACTIVE])
        candidates = [job for job in records if job.state is JobState.RUNNING and job.copy is None
                      and job.started_at and job.speculate]
        if not candidates:
            return
        slots = self.floating_slots()
        live = [job.copy for job in records
                if job.copy and CopyState(job.copy.get("state")).is_live]
        budget = copy_budget(len(slots), len(live))
        if budget <= 0 or len(slots) < 2:
            return
        idle = self.idle_slots(slots, {job.node for job in status.jobs if job.state in ACTIVE}
                               | {copy.get("node") for copy in live})
        if not idle:
            return
        now = time.time()
        for script in sorted({job.script for job in candidates}):
            per_unit = {slot: estimate.seconds_per_unit
                        for slot, estimate in SlotSpeeds(self.client).of(script).items()}
            running = [RunningJob(job.job_id, job.node, cost_of(job), now - job.started_at)
                       for job in candidates if job.script == script]
            chosen = backup_copies(running, idle, per_unit, budget)
            for job_id, slot in chosen.items():
                if publish_copy(self.client, self.app, self.run_id, job_id, slot) is None:
                    continue
                job = next(job for job in running if job.job_id == job_id)
                self.options.notice(
                    f"backup copy: job {job_id} has run {job.elapsed_s:.1f} s on {job.slot} "
                    f"(about {time_left(job, per_unit):.1f} s left there); a copy starts on "
                    f"idle {slot}, where it takes about {job.cost * per_unit[slot]:.1f} s; "
                    f"the first to succeed wins")
                idle.remove(slot)
                budget -= 1

    def floating_slots(self) -> list[str]:
        """The slots whose live workers take floating jobs, by name."""
        serving = ClusterView(self.client).serving([FLOATING_NODE]).get(FLOATING_NODE, [])
        return sorted({slot_of_worker(name) for name in serving})

    def idle_slots(self, slots: list[str], busy: set[str]) -> list[str]:
        """The slots of ``slots`` that run nothing (no lease held, not in ``busy``) and have
        nothing queued of their own."""
        leases = self.client.mget([lease_key(slot) for slot in slots])
        return [slot for slot, lease in zip(slots, leases, strict=True)
                if not lease and slot not in busy and not self.broker.llen(queue_for(slot))]

    def settle_held(self, held: list[str]) -> None:
        """Release the held jobs whose dependencies all succeeded, end those one of whose
        failed: what the workers that ended those dependencies do, done again in case one
        died between its steps."""
        released, ended = Dependencies(self.client, self.broker).settle(self.run_id, held)
        if released:
            self.options.notice(f"released {len(released)} held jobs whose dependencies "
                                f"succeeded: {listing(released)}")
        if ended:
            self.options.notice(f"{len(ended)} held jobs ended without running (a dependency "
                                f"failed): {listing(ended)}")

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
        """Move the queued jobs of nodes without a live worker for ``failover`` seconds."""
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
        # One policy for every dead node: each move adds to its target's load, so moved
        # jobs spread over the least loaded nodes, not onto the first by name.
        placement = LeastLoaded(targets, target_loads(self.broker, records, targets))
        for node in dead:
            jobs = [job for job in records if job.node == node and not job.state.is_final]
            moved = move_jobs(self.client, self.app, self.run_id, jobs, placement, live,
                              self.broker)
            if moved:
                where = ", ".join(f"{target} ({len(ids)})" for target, ids in moved.items())
                count = sum(map(len, moved.values()))
                self.options.notice(f"failover: node {node} has had no worker for "
                                    f"{self.options.failover:g} s; moved {count} queued jobs "
                                    f"to {where}")
            self.unserved_since.pop(node, None)
