"""Making the records agree with the world: ``.done`` files, live workers, messages.

The ``.done`` file is the truth and a record is bookkeeping. After a broker
restart, a lost message or a killed worker, records can say ``running`` or
``queued`` about jobs that are finished, abandoned, or gone. ``settle`` and
``find_lost`` look at what can be seen from the head node and fix the
records with the same atomic transitions the workers use (each guarded by the
job's current task id, so a live attempt is never overruled):

* a ``running`` job whose ``.done`` exists here is ``succeeded``;
* a ``running`` job that does not hold its node's lease (its worker died) is
  ``queued`` again; once no worker holds its unacknowledged message, the message goes back
  to its queue (kombu's own restore: what the visibility timeout, 12 h by default, would do
  then), so a floating job runs on the first free node and a pinned one as soon as its
  node's worker is back;
* a ``queued`` or ``running`` job whose message is in no queue, not in flight
  and not run by any worker is ``lost`` (``coordinator retry --lost``).

Moving jobs off a dead node (``move_jobs``) republishes them where a placement policy
puts them; the old messages become stale and are dropped where they arrive. When to do any
of this is the scheduler's decision (``coordinator.scheduler``), not this module's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from coordinator.cluster_view import ClusterView, Liveness
from coordinator.dead_attempts import (
    DeadAttempt,
    announce,
    dead_reason,
    requeue_error,
    requeued_dead,
    with_dead_attempt,
)
from coordinator.placement import Placement, placed
from coordinator.records import JobRecord
from coordinator.submission import republish
from worker_tasks.presence import alive
from worker_tasks.spec import FLOATING_NODE, is_floating, queue_for
from worker_tasks.tracking import ACTIVE, MOVABLE, JobState, JobTracker
from worker_tasks.tracking import now as timestamp

logger = logging.getLogger("coordinator")

# A message missing from every place is checked again after this long before the job is
# called lost: kombu moves a message from its queue to the unacked set in two steps.
LOST_RECHECK_S = 1.5
# A worker unseen this long (seconds) is taken for dead, and a message it left unacknowledged
# goes back to its queue. Much shorter, and a worker only frozen (SIGSTOP, a paused VM) would
# wake to run the job beside its new delivery; kombu itself waits SC_VISIBILITY_TIMEOUT.
RETURN_AFTER_S = float(os.environ.get("SC_RETURN_AFTER", "60"))
# kombu's Redis transport keys (its defaults) and priority queue suffixes.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


def settle(client: redis.Redis, run_id: str, jobs: Sequence[JobRecord], live: Liveness,
           workdir: Path, app: Celery | None = None) -> list[str]:
    """Settle ``running`` records by their ``.done`` and their worker; returns what changed.

    ``jobs``: full records. An attempt found dead is kept in the job's history, and ended in
    Flower through ``app`` (``coordinator.dead_attempts``).
    """
    tracker = JobTracker(client)
    notes: list[str] = []
    dead: list[DeadAttempt] = []
    for job in jobs:
        if job.state not in ACTIVE:
            continue
        if job.done_file and (workdir / job.done_file).exists():
            if tracker.settle_done(run_id, job.job_id, job.task_id).ok:
                notes.append(f"{job.job_id}: succeeded (its .done exists; its worker's final "
                             f"write was lost)")
        elif not live.running(job):
            error = requeue_error(job)
            node = FLOATING_NODE if job.floating else None
            record = vars(job)
            if tracker.requeue_dead(run_id, job.job_id, job.task_id, error, node,
                                    with_dead_attempt(record)).ok:
                notes.append(f"{job.job_id}: requeued ({error})")
                if job.task_id and job.host:
                    dead.append(DeadAttempt(job.task_id, job.host, dead_reason(record), True))
    announce(app, dead)
    return notes


def return_dead_messages(client: redis.Redis, app: Celery, jobs: Sequence[JobRecord]
                         ) -> list[str]:
    """The queued jobs whose attempt died with its worker (``requeued_dead``): their
    unacknowledged messages back in their queues, once no worker holds them: the worker has
    not been seen for ``RETURN_AFTER_S``, or one of its name is up again (a new process,
    which knows nothing of its predecessor's message) and neither it nor any other runs or
    holds the task. Returns a line for each."""
    waiting = [job for job in jobs if job.state is JobState.QUEUED and job.task_id
               and job.started_at and requeued_dead(job)]
    if not waiting:
        return []
    hosts = {job.host for job in waiting if job.host}
    present = set(alive(client, hosts))
    unseen_long = hosts - set(alive(client, hosts, within=RETURN_AFTER_S))
    held = ClusterView(client, app).in_flight() if present else set()
    orphans = {job.task_id: job.started_at for job in waiting
               if job.task_id and job.started_at and job.task_id not in held
               and (job.host in present or job.host in unseen_long)}
    returned = return_unacked(app, orphans)
    return [f"{job.job_id}: its message, left unacknowledged by worker {job.host}, is back "
            f"in its queue" for job in waiting if job.task_id in returned]


def return_unacked(app: Celery, delivered_before: Mapping[str, float]) -> set[str]:
    """Put the unacknowledged messages of the task ids in ``delivered_before`` back in their
    queues, next to be taken, with kombu's own restore (what its visibility timeout does,
    12 h later by default); each only if kombu delivered it before that time, so a later,
    live delivery of it stays. Returns the task ids whose message went back."""
    if not delivered_before:
        return set()
    returned: set[str] = set()
    try:
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            broker = channel.client
            for tag, entry in broker.hgetall(channel.unacked_key).items():
                task_id = unacked_task_id(entry)
                if task_id not in delivered_before:
                    continue
                delivered = broker.zscore(channel.unacked_index_key, tag)
                if delivered is None or delivered > delivered_before[task_id]:
                    continue
                channel.qos.restore_by_tag(tag, client=broker)
                returned.add(task_id)
    except (OperationalError, redis.RedisError) as err:  # the next settle tries again
        logger.warning("could not return unacknowledged messages (broker away?): %s", err)
    return returned


def unacked_task_id(entry: bytes) -> str | None:
    """The task id of an entry of kombu's unacknowledged set (``[message, exchange, routing
    key]``); None if it cannot be read."""
    try:
        return str(json.loads(entry)[0]["headers"]["id"])
    except (ValueError, LookupError, TypeError):
        return None


def queue_keys(node: str, broker: redis.Redis | None = None) -> list[str]:
    """The Redis lists that hold a node's messages: its queue (with kombu's priority lists),
    and the queues of its GPUs in per-GPU mode."""
    queues = [queue_for(node)]
    if broker is not None:
        queues += [key.decode() for key in broker.scan_iter(match=f"{queue_for(node)}.gpu*",
                                                             count=1000)
                   if PRIORITY_SEPARATOR.encode() not in key]
    return [key for queue in queues
            for key in (queue, *(f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS))]


def messages_present(broker: redis.Redis, nodes: Iterable[str], task_ids: set[str],
                     in_flight: set[str]) -> set[str]:
    """The task ids among ``task_ids`` that exist somewhere: a node queue, unacked, a worker."""
    found = set(task_ids & in_flight)
    wanted = task_ids - found
    if not wanted:
        return found
    blobs: list[bytes] = list(broker.hvals(UNACKED_KEY))
    for node in set(nodes):
        for key in queue_keys(node, broker):
            blobs.extend(broker.lrange(key, 0, -1))
    encoded = {task_id: json.dumps(task_id).encode() for task_id in wanted}
    for blob in blobs:
        for task_id, needle in encoded.items():
            if needle in blob:
                found.add(task_id)
    return found


def remove_messages(broker: redis.Redis, nodes: Iterable[str], task_ids: set[str]) -> int:
    """Delete the messages of ``task_ids`` from the nodes' queues and from the unacknowledged
    set (a dead worker's), so moved jobs' old messages stop counting as work; returns how many.

    Each one is stale already (a worker would drop it on arrival); this only spares the
    queue lengths, ``sc_queue_length`` and the alerts built on it, and the redelivery.
    """
    if not task_ids:
        return 0
    needles = [json.dumps(task_id).encode() for task_id in task_ids]
    removed = 0
    for node in set(nodes):
        for key in queue_keys(node, broker):
            for blob in broker.lrange(key, 0, -1):
                if any(needle in blob for needle in needles):
                    removed += int(broker.lrem(key, 1, blob))
    for tag, blob in broker.hgetall(UNACKED_KEY).items():
        if any(needle in blob for needle in needles):
            pipe = broker.pipeline()
            pipe.hdel(UNACKED_KEY, tag)
            pipe.zrem(UNACKED_INDEX_KEY, tag)
            removed += int(pipe.execute()[0])
    return removed


def queue_is_short(broker: redis.Redis, jobs: Sequence[JobRecord]) -> bool:
    """A cheap first look: fewer messages for some node than this run has jobs waiting there."""
    waiting: dict[str, int] = defaultdict(int)
    for job in jobs:
        waiting[job.node] += 1
    unacked = broker.hlen(UNACKED_KEY)
    for node, count in waiting.items():
        pipe = broker.pipeline(transaction=False)
        for key in queue_keys(node, broker):
            pipe.llen(key)
        if sum(pipe.execute()) + unacked < count:
            return True
    return False


def find_lost(app: Celery, client: redis.Redis, broker: redis.Redis, run_id: str,
              jobs: Sequence[JobRecord], live: Liveness) -> list[str]:
    """Mark ``lost`` the waiting jobs whose message exists nowhere; returns their ids."""
    suspects = [job for job in jobs if job.task_id and (
        job.state is JobState.QUEUED or (job.state in ACTIVE and not live.running(job)))]
    if not suspects or not queue_is_short(broker, suspects):
        return []
    nodes = {job.node for job in suspects}
    ids = {job.task_id for job in suspects if job.task_id}
    view = ClusterView(client, app)
    missing = ids - messages_present(broker, nodes, ids, view.in_flight())
    if not missing:
        return []
    time.sleep(LOST_RECHECK_S)  # a message between its queue and the unacked set shows up now
    missing -= messages_present(broker, nodes, missing, view.in_flight())
    tracker = JobTracker(client)
    lost: list[str] = []
    for job in suspects:
        if job.task_id in missing:
            error = ("its message is gone (broker restarted without persistence, or purged) "
                     "and no worker runs it: coordinator retry --lost")
            if tracker.mark_lost(run_id, job.job_id, job.task_id, error).ok:
                lost.append(job.job_id)
    return lost


def place_floating(client: redis.Redis, app: Celery, broker: redis.Redis, run_id: str,
                   jobs: Sequence[JobRecord], placement: Placement) -> dict[str, list[str]]:
    """Queued floating jobs out of the shared queue, each onto the slot ``placement`` gives
    it; returns slot -> job ids. A job a worker took meanwhile stays where it is: only a
    record still queued is republished (under a new task id, so the old message, wherever
    it is, is dropped as stale), and the old message is then deleted from the shared queue.
    """
    waiting = [job for job in jobs if job.floating and job.state is JobState.QUEUED]
    plan = placed(placement, [(job.job_id, job.node) for job in waiting])
    on_slot: dict[str, list[str]] = defaultdict(list)
    for job in waiting:
        on_slot[plan[job.job_id]].append(job.job_id)
    by_slot: dict[str, list[str]] = {}
    for slot, job_ids in on_slot.items():  # one publish per slot (each opens a connection)
        done = republish(client, app, run_id, job_ids, (JobState.QUEUED,),
                         lambda record, slot=slot: {"node": slot},
                         note=f"tail: placed on {slot}, where it finishes first")
        if done:
            by_slot[slot] = done
    placed_ids = {job_id for job_ids in by_slot.values() for job_id in job_ids}
    remove_messages(broker, {FLOATING_NODE}, {job.task_id for job in waiting
                                              if job.job_id in placed_ids and job.task_id})
    return dict(by_slot)


def float_again(client: redis.Redis, app: Celery, broker: redis.Redis, run_id: str,
                jobs: Sequence[JobRecord], live_slots: Iterable[str]) -> dict[str, list[str]]:
    """Queued floating jobs the tail placed on a slot not in ``live_slots`` (its worker is
    gone) back to the shared queue, under a new task id, the old message deleted from the
    slot's queue; returns slot -> job ids. A job a worker took meanwhile stays."""
    live = set(live_slots)
    stranded = [job for job in jobs if job.floating and job.state is JobState.QUEUED
                and not is_floating(job.node) and job.node not in live]
    on_slot: dict[str, list[str]] = defaultdict(list)
    for job in stranded:
        on_slot[job.node].append(job.job_id)
    by_slot: dict[str, list[str]] = {}
    for slot, job_ids in on_slot.items():  # one publish per slot
        floated = republish(client, app, run_id, job_ids, (JobState.QUEUED,),
                            lambda record: {"node": FLOATING_NODE},
                            note=f"back to the shared queue: no worker serves {slot}, where "
                                 f"the tail placed it")
        if floated:
            by_slot[slot] = floated
    moved = {job_id for job_ids in by_slot.values() for job_id in job_ids}
    remove_messages(broker, set(by_slot), {job.task_id for job in stranded
                                           if job.job_id in moved and job.task_id})
    return by_slot


def move_jobs(client: redis.Redis, app: Celery, run_id: str, jobs: Sequence[JobRecord],
              placement: Placement, live: Liveness | None = None,
              broker: redis.Redis | None = None) -> dict[str, list[str]]:
    """Republish ``jobs`` where ``placement`` puts them; returns target -> job ids.

    Pinned jobs and jobs whose attempt is alive stay. A running job whose worker died keeps
    its dead attempt in its history, and Flower sees that attempt end
    (``coordinator.dead_attempts``). With ``broker``, the moved jobs' old messages are
    deleted from the nodes they left (``remove_messages``).
    """
    # Pinned jobs stay; floating ones need no move (any live worker takes them).
    movable = [job for job in jobs if not job.pin and not job.floating and (
        job.state in (JobState.QUEUED, JobState.LOST)
        or (job.state is JobState.RUNNING and live is not None and not live.running(job)))]
    plan = placed(placement, [(job.job_id, job.node) for job in movable])
    by_target: dict[str, list[str]] = defaultdict(list)
    dead: list[DeadAttempt] = []
    for job in movable:
        target = plan[job.job_id]

        def change(record: dict[str, Any], target: str = target) -> dict[str, Any]:
            moved = {"node": target, "moved_from": record["node"]}
            if record.get("state") == JobState.RUNNING:  # its worker died
                moved["history"] = with_dead_attempt(record)
            return moved

        done = republish(client, app, run_id, [job.job_id], MOVABLE, change,
                         note=f"moved from {job.node} to {target}")
        by_target[target].extend(done)
        # Its old attempt died with its worker (still running in the record, or requeued for
        # a redelivery that will not come now): Flower sees it fail, moved.
        if done and job.task_id and job.host and (
                job.state is JobState.RUNNING or requeued_dead(job)):
            reason = f"{dead_reason(vars(job))}; moved to {target}"
            dead.append(DeadAttempt(job.task_id, job.host, reason, requeued=False))
    if by_target:
        record_moves(client, run_id, jobs, by_target)
        if broker is not None:
            moved = {job_id for job_ids in by_target.values() for job_id in job_ids}
            remove_messages(broker, {job.node for job in movable if job.job_id in moved},
                            {job.task_id for job in movable
                             if job.job_id in moved and job.task_id})
    announce(app, dead)
    return dict(by_target)


def record_moves(client: redis.Redis, run_id: str, jobs: Sequence[JobRecord],
                 by_target: dict[str, list[str]]) -> None:
    """Keep what moved where in the run's metadata, for the summary."""
    origin = {job.job_id: job.node for job in jobs}
    moves = []
    for target, job_ids in by_target.items():
        for source in sorted({origin[job_id] for job_id in job_ids}):
            moved = [job_id for job_id in job_ids if origin[job_id] == source]
            moves.append({"from": source, "to": target, "jobs": moved, "at": timestamp()})
    JobTracker(client).add_moves(run_id, moves)
