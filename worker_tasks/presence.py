"""Which workers serve which nodes, kept in Redis by the workers themselves.

A worker adds itself to its nodes' sets when it is ready and again at every
Celery heartbeat (every 2 s), and removes itself on a warm shutdown; an entry
not refreshed for ``PRESENCE_TTL_S`` seconds no longer counts (a killed
worker). The head node reads these in one round trip instead of broadcasting
an inspect and waiting a second for replies.

Keys: ``<p>:workers:<node>``, a sorted set of worker names scored by last sighting.
Reading them needs no Celery (``coordinator status`` starts quicker); a worker connects
its hooks with ``connect_hooks``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from functools import cache
from typing import Any

import redis

from worker_tasks.connections import redis_client
from worker_tasks.spec import node_of_queue
from worker_tasks.tracking import KEY_PREFIX

logger = logging.getLogger(__name__)

# A worker unseen for this long (seconds) no longer serves its nodes.
PRESENCE_TTL_S = 10.0


def presence_key(node: str, prefix: str = KEY_PREFIX) -> str:
    return f"{prefix}:workers:{node}"


def seen_key(prefix: str = KEY_PREFIX) -> str:
    """Every worker of ours lately, by last sighting: one key says whether any announced
    itself here (``holds_ours``), without scanning a Redis that may be another program's."""
    return f"{prefix}:workers-seen"


def verifying_key(prefix: str = KEY_PREFIX) -> str:
    """The workers that run only signed jobs (they hold a trust store), by last sighting."""
    return f"{prefix}:workers-verifying"


def verifying(client: redis.Redis, workers: Iterable[str]) -> list[str]:
    """Those of ``workers`` seen lately holding a trust store: they refuse unsigned jobs."""
    return seen_lately(client, verifying_key(), workers)


def alive(client: redis.Redis, workers: Iterable[str], within: float = PRESENCE_TTL_S
          ) -> list[str]:
    """Those of ``workers`` seen serving any node within the last ``within`` seconds."""
    return seen_lately(client, seen_key(), workers, within)


def seen_lately(client: redis.Redis, key: str, workers: Iterable[str],
                within: float = PRESENCE_TTL_S) -> list[str]:
    """Those of ``workers`` whose last sighting in the sorted set ``key`` is within the
    last ``within`` seconds."""
    names = sorted(set(workers))
    if not names:
        return []
    seen = client.zmscore(key, names)
    cutoff = time.time() - within
    return [name for name, score in zip(names, seen, strict=True)
            if score is not None and score >= cutoff]


def serving(client: redis.Redis, nodes: Iterable[str]) -> dict[str, list[str]]:
    """node -> names of the workers seen serving it within the last ``PRESENCE_TTL_S``."""
    names = sorted(set(nodes))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for node in names:
        pipe.zrangebyscore(presence_key(node), time.time() - PRESENCE_TTL_S, "+inf")
    return {node: sorted(worker.decode() for worker in workers)
            for node, workers in zip(names, pipe.execute(), strict=True) if workers}


def seen_since(client: redis.Redis, nodes: Iterable[str], since: float,
               prefix: str = KEY_PREFIX) -> set[str]:
    """Names of the workers of ``nodes`` that announced themselves at or after ``since``
    (``prefix``: the workers' SC_KEY_PREFIX, when it is not this process's)."""
    names = sorted(set(nodes))
    pipe = client.pipeline(transaction=False)
    for node in names:
        pipe.zrangebyscore(presence_key(node, prefix), since, "+inf")
    return {worker.decode() for workers in pipe.execute() for worker in workers}


class Presence:
    """This worker's entry in its nodes' sets (used from the worker's main process)."""

    def __init__(self) -> None:
        self.hostname = ""
        self.nodes: list[str] = []
        self.verifies = False  # it holds a trust store: it runs only signed jobs

    @cache  # noqa: B019 (one client for the life of the worker process)
    def client(self) -> redis.Redis:
        from worker_tasks.celery_app import app

        url = os.environ.get("SC_TRACKING_URL") or app.conf.broker_url
        return redis_client(url, socket_connect_timeout=2, socket_timeout=2)

    def announce(self) -> None:
        if not self.nodes:
            return
        try:
            pipe = self.client().pipeline(transaction=False)
            for node in self.nodes:
                pipe.zadd(presence_key(node), {self.hostname: time.time()})
                pipe.expire(presence_key(node), int(PRESENCE_TTL_S * 6))
            pipe.zadd(seen_key(), {self.hostname: time.time()})
            pipe.expire(seen_key(), int(PRESENCE_TTL_S * 6))
            if self.verifies:
                pipe.zadd(verifying_key(), {self.hostname: time.time()})
                pipe.expire(verifying_key(), int(PRESENCE_TTL_S * 6))
            pipe.execute()
        except redis.RedisError as err:  # the next heartbeat tries again
            logger.debug("presence not recorded: %s", err)

    def withdraw(self) -> None:
        with contextlib.suppress(redis.RedisError):
            for node in self.nodes:
                self.client().zrem(presence_key(node), self.hostname)
            self.client().zrem(verifying_key(), self.hostname)


PRESENCE = Presence()


def connect_hooks() -> None:
    """Keep this worker's entry: announced when ready and at every heartbeat, withdrawn at
    a warm shutdown (called once, by ``worker_tasks.worker``)."""
    from celery.signals import heartbeat_sent, worker_ready, worker_shutdown

    worker_ready.connect(on_worker_ready, dispatch_uid=f"{__name__}.ready")
    heartbeat_sent.connect(on_heartbeat, dispatch_uid=f"{__name__}.heartbeat")
    worker_shutdown.connect(on_worker_shutdown, dispatch_uid=f"{__name__}.shutdown")


def on_worker_ready(sender: Any = None, **kwargs: Any) -> None:
    queues = [queue.name for queue in sender.task_consumer.queues]
    PRESENCE.hostname = sender.hostname
    # A per-GPU worker (node.rig-a.gpu1) serves its node too: presence is by node.
    PRESENCE.nodes = sorted({node for node in map(node_of_queue, queues) if node})
    from worker_tasks.signing import trust_store

    PRESENCE.verifies = trust_store() is not None
    PRESENCE.announce()


def on_heartbeat(sender: Any = None, **kwargs: Any) -> None:
    PRESENCE.announce()


def on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    PRESENCE.withdraw()
