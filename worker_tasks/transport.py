"""The broker transports this project consumes through: kombu's Redis and Sentinel transports,
with one change. An item of a queue that is no message envelope is dropped with one line.

kombu decodes each item it pops before any hook of Celery's or ours runs, and an item that
is not JSON, or JSON of another shape, ends the worker ("Unrecoverable error") or drops its
connection. Anyone who can write to Redis could stop every worker with one ``LPUSH``. The
item is already popped when it is read, so dropping it loses nothing that was a message.

``install()`` points the ``redis``, ``rediss`` and ``sentinel`` schemes at these classes, so
every URL keeps its meaning (TLS, Sentinel) and only the reading changes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from queue import Empty
from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

logger = logging.getLogger("worker_tasks.transport")

# How much of a dropped item the log line quotes (characters).
QUOTED_CHARS = 80


def envelope_problem(message: Any) -> str | None:
    """Why ``message`` (an item, decoded) is no envelope kombu can read, or None. Its body
    is not judged here: the task's own checks do that."""
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__}, not an object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "no properties object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "no delivery tag"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "delivery_info is not an object"
    if not isinstance(message.get("headers", {}), dict):
        return "headers is not an object"
    for name in ("content-type", "content-encoding"):
        if not isinstance(message.get(name, ""), str | None):
            return f"{name} is not a string"
    body = message.get("body")
    if body is not None and not isinstance(body, str):
        return "body is not a string"
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"body_encoding {str(encoding)[:QUOTED_CHARS]!r} is unknown"
    if encoding == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not base64"
    return None


def drop(queue: str | None, why: str) -> None:
    logger.error("dropped an item of queue %s that is no message (%s); nothing run",
                 queue or "?", why)


class LastQueue:
    """kombu's cycle of a channel's queues, remembering the queue it was last told an item
    came from: kombu tells it as it pops the item, before it decodes it.

    Parameters:
        cycle: the channel's own cycle (``round_robin`` by default), which does the work.
    """

    def __init__(self, cycle: Any) -> None:
        self.cycle = cycle
        self.last: str | None = None

    def rotate(self, last_used: str) -> Any:
        self.last = last_used
        return self.cycle.rotate(last_used)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cycle, name)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; an item that is not JSON is dropped, not fatal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue_cycle = LastQueue(self._queue_cycle)

    def _brpop_read(self, **options: Any) -> bool:
        self._queue_cycle.last = None
        try:
            return bool(super()._brpop_read(**options))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            # Popped already (BRPOP): nothing is left to acknowledge or restore.
            drop(self._queue_cycle.last, f"not JSON: {str(err)[:QUOTED_CHARS]}")
            raise Empty() from None


class Transport(kombu_redis.Transport):
    """kombu's Redis transport, reading through ``Channel``; an item of the wrong shape is
    dropped before kombu builds a message of it."""

    Channel = Channel

    def _deliver(self, message: Any, queue: str | None) -> None:
        problem = envelope_problem(message)
        if problem is not None:
            drop(queue, problem)
            return
        super()._deliver(message, queue)


class SentinelChannel(kombu_redis.SentinelChannel, Channel):
    """kombu's Sentinel channel with ``Channel``'s reading."""


class SentinelTransport(kombu_redis.SentinelTransport, Transport):
    """kombu's Sentinel transport with ``Transport``'s checks."""

    Channel = SentinelChannel


# The schemes whose transport is replaced, and by what.
SCHEMES = {"redis": f"{__name__}:Transport", "rediss": f"{__name__}:Transport",
           "sentinel": f"{__name__}:SentinelTransport"}


def install() -> None:
    """Make the redis, rediss and sentinel schemes use these transports in this process
    (before any connection is made: kombu caches the class of each scheme)."""
    kombu_transport.TRANSPORT_ALIASES.update(SCHEMES)
    cache = getattr(kombu_transport, "_transport_cache", {})
    for scheme in SCHEMES:
        cache.pop(scheme, None)
