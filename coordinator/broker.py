"""Connections from the head node: the tracking Redis and the Celery publisher."""

from __future__ import annotations

import os
import re

import redis
from celery import Celery

import celeryconfig
from coordinator.errors import BrokerUnreachableError
from worker_tasks.app import make_app

# How long a command waits for Redis before it says it is unreachable (exit 3).
CONNECT_TIMEOUT_S = float(os.environ.get("SC_CONNECT_TIMEOUT", "3"))


def broker_url(url: str | None = None) -> str:
    """The broker URL in force: explicit, else ``SC_BROKER_URL``, else local Redis."""
    return url or os.environ.get("SC_BROKER_URL") or celeryconfig.broker_url


def tracking_url(url: str | None = None, broker: str | None = None) -> str:
    """Run records live in ``SC_TRACKING_URL`` or, by default, in the broker's Redis."""
    return url or os.environ.get("SC_TRACKING_URL") or broker_url(broker)


def redact(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def connect_tracking(url: str | None = None, broker: str | None = None) -> redis.Redis:
    """A client on the tracking Redis, pinged: raises ``BrokerUnreachableError`` fast."""
    target = tracking_url(url, broker)
    client = redis.Redis.from_url(
        target, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S * 3
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as err:
        raise BrokerUnreachableError(f"cannot reach Redis at {redact(target)}: {err}") from None
    return client


def publisher(url: str | None = None) -> Celery:
    """The Celery app used to publish jobs (same settings as the workers).

    Its result backend is disabled: the head node reads job states from the
    tracking records, and a Redis backend would subscribe to every task's result
    channel as it is sent. Workers still store results with their own settings.
    """
    app = make_app(broker_url(url))
    app.conf.result_backend = None
    return app


def check_broker(app: Celery) -> None:
    """Connect once, fast: raises ``BrokerUnreachableError`` instead of retrying for long."""
    url = app.conf.broker_url
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
    except Exception as err:  # kombu raises OperationalError or the transport's own
        raise BrokerUnreachableError(f"cannot reach the broker at {redact(url)}: {err}") from None
