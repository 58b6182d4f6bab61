"""Which workers are alive, and what they run: the head node's one view of the cluster.

Four sources, each for what it is good at, all read here:

* **serving** (the presence registry, ``worker_tasks.presence``): workers announce
  their nodes every heartbeat; one Redis round trip, lags a killed worker by
  ``PRESENCE_TTL_S``. For warnings, failover, metrics.
* **consuming** (Celery's ``inspect().active_queues()``): the workers that answer
  right now, by the queues they consume; a second's wait for replies. For ``status``.
* **answering** and **running** (``ping``, ``inspect().active()``/``reserved()``):
  names that answer, the jobs they hold. For ``cluster status`` and lost jobs.
* **leases** (``worker_tasks.lease``): which attempt holds each slot's lease, the
  only proof that an attempt is alive (a restarted worker has the dead one's name).

Keys: a *node* is a label (``rig-a``); a *slot* is what runs one job at a time, the
node or one GPU of it in per-GPU runs (``rig-a.gpu1``). Every mapping here says
which of the two it is keyed by; names and queues are parsed in ``worker_tasks.spec``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from coordinator.records import JobRecord

if TYPE_CHECKING:  # only a caller that asks the workers passes an app
    from celery import Celery

    from worker_tasks.speeds import SlotSpeed
from worker_tasks.lease import task_of_token
from worker_tasks.presence import serving
from worker_tasks.spec import node_of_queue, node_of_slot, queue_for, slot_of_queue
from worker_tasks.tracking import lease_key

# How long the head node waits for workers' replies to ping and inspect (seconds): while
# it follows a run, and for an operator's look at every node over real networks (``cluster
# status``: signed replies, nodes a long way off).
INSPECT_TIMEOUT_S = 1.0
OPERATOR_INSPECT_TIMEOUT_S = 2.0


@dataclass
class Liveness:
    """Which attempts are alive right now: who holds each node's lease (or its GPUs').

    A worker takes its slot's lease before a job starts and renews it while the job
    runs; the holder names the job's task id.
    """

    leases: dict[str, list[str]] = field(default_factory=dict)  # node -> lease holders

    def running(self, job: JobRecord) -> bool:
        """The job's attempt is alive: it holds its node's lease (or one of its GPUs')."""
        if not job.task_id:
            return False
        return any(task_of_token(holder) == job.task_id
                   for holder in self.leases.get(job.node, []))

    def held(self, node: str) -> bool:
        return bool(self.leases.get(node))


class ClusterView:
    """The head node's view of the workers, asked lazily, each source at most once.

    Parameters:
        client: the tracking Redis (presence, leases).
        app: a Celery app on the broker (ping, inspect); only the methods that ask the
            workers themselves need it.
        timeout: how long to wait for workers' replies (seconds).
        broker: a client on the broker's Redis, where the queues are (``queue_length``);
            the tracking Redis may be another server (``SC_TRACKING_URL``).
    """

    def __init__(self, client: redis.Redis, app: Celery | None = None,
                 timeout: float = INSPECT_TIMEOUT_S, broker: redis.Redis | None = None) -> None:
        self.client = client
        self.app = app
        self.timeout = timeout
        self.broker = broker
        self._queues: dict[str, list[str]] | None = None
        self._answering: set[str] | None = None
        self._active: dict[str, list[dict[str, Any]]] | None = None

    # -- the presence registry --------------------------------------------------------------

    def serving(self, nodes: Iterable[str]) -> dict[str, list[str]]:
        """node -> workers that announced themselves for it lately (presence)."""
        return serving(self.client, nodes)

    # -- the workers themselves -------------------------------------------------------------

    def _inspect(self) -> Any:
        assert self.app is not None, "asking the workers needs a Celery app"
        return self.app.control.inspect(timeout=self.timeout)

    def consumed_queues(self) -> dict[str, list[str]]:
        """worker -> the node queues it consumes, as it says right now."""
        if self._queues is None:
            replies = self._inspect().active_queues() or {}
            self._queues = {worker: [queue.get("name", "") for queue in queues or []
                                     if node_of_queue(queue.get("name", ""))]
                            for worker, queues in replies.items()}
        return self._queues

    def consuming_nodes(self) -> dict[str, list[str]]:
        """node -> workers consuming its queue or one of its GPUs' (per-GPU workers)."""
        return self._fold(node_of_queue)

    def consuming_slots(self) -> dict[str, list[str]]:
        """slot -> workers consuming exactly that slot's queue."""
        return self._fold(slot_of_queue)

    def _fold(self, key: Any) -> dict[str, list[str]]:
        folded: dict[str, list[str]] = defaultdict(list)
        for worker, queues in sorted(self.consumed_queues().items()):
            for name in sorted({key(queue) for queue in queues}):
                folded[name].append(worker)
        return dict(folded)

    def answering(self) -> set[str]:
        """Names of the workers that answer a ping."""
        if self._answering is None:
            assert self.app is not None, "a ping needs a Celery app"
            replies = self.app.control.ping(timeout=self.timeout) or []
            self._answering = {name for reply in replies for name in reply}
        return self._answering

    def active(self) -> dict[str, list[dict[str, Any]]]:
        """worker -> the tasks it is running (Celery's ``inspect().active()``)."""
        if self._active is None:
            self._active = self._inspect().active() or {}
        return self._active

    def current_job(self, worker: str) -> str | None:
        """``<job> (run <run>)`` of the job ``worker`` runs, if any."""
        for task in self.active().get(worker, []):
            args = task.get("args") or []
            message = args[0] if isinstance(args, list) and args else {}
            if isinstance(message, dict):
                return f"{message.get('job_id')} (run {message.get('run_id')})"
        return None

    def in_flight(self) -> set[str]:
        """Task ids that live workers run or hold right now."""
        inspect = self._inspect()
        ids: set[str] = set()
        for replies in (inspect.active() or {}, inspect.reserved() or {}):
            for tasks in replies.values():
                ids.update(task.get("id") for task in tasks or [] if task.get("id"))
        return ids

    # -- the broker's queues -----------------------------------------------------------------

    @classmethod
    def for_operator(cls, broker: str | None) -> tuple[ClusterView | None, str | None]:
        """The cluster as the head node's broker sees it, asked once with an operator's
        timeouts (``cluster status``); or None and why it cannot be seen."""
        from coordinator.broker import (
            broker_client,
            broker_url,
            connect_tracking,
            publisher,
            redact,
        )
        from coordinator.errors import BrokerUnreachableError

        try:
            view = cls(connect_tracking(None, broker), publisher(broker),
                       timeout=OPERATOR_INSPECT_TIMEOUT_S, broker=broker_client(broker))
            if view.answering():
                view.active()
        except (BrokerUnreachableError, redis.RedisError, OSError) as err:
            return None, f"broker {redact(broker_url(broker))} unreachable from here: {err}"
        return view, None

    def speeds(self, scripts: Iterable[str] | None = None) -> dict[str, dict[str, SlotSpeed]]:
        """script -> slot -> its learned speed (``worker_tasks.speeds``), for ``scripts`` or
        every script with estimates."""
        from worker_tasks.speeds import SlotSpeeds

        speeds = SlotSpeeds(self.client)
        named = speeds.scripts() if scripts is None else sorted(scripts)
        return {script: found for script in named if (found := speeds.of(script))}

    def waiting(self, slot: str) -> int:
        """Messages waiting in ``slot``'s queue."""
        return self.queue_length(queue_for(slot))

    def queue_length(self, queue: str) -> int:
        """Messages waiting in ``queue``, read where the queues are: the broker."""
        assert self.broker is not None, "queue lengths need a client on the broker"
        return int(self.broker.llen(queue))

    # -- leases -----------------------------------------------------------------------------

    def liveness(self, nodes: Iterable[str]) -> Liveness:
        """Who holds the leases of ``nodes`` (and of their GPUs, in per-GPU runs)."""
        wanted = set(nodes)
        keys = {lease_key(node): node for node in sorted(wanted)}
        # GPU slots' leases (rig-a.gpu1): one scan for all nodes, not one per node (each
        # scan walks the whole keyspace).
        for key in self.client.scan_iter(match=lease_key("*.gpu*"), count=1000):
            name = key.decode()
            node = node_of_slot(name.removeprefix(lease_key("")))
            if node in wanted:
                keys[name] = node
        leases: dict[str, list[str]] = defaultdict(list)
        values = self.client.mget(list(keys)) if keys else []
        for key, value in zip(keys, values, strict=True):
            if value:
                leases[keys[key]].append(value.decode())
        return Liveness(leases=dict(leases))
