"""Connections from the head node: the tracking Redis and the Celery publisher."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

import celeryconfig
from coordinator.errors import BrokerUnreachableError, InvalidJobsError
from worker_tasks.connections import (
    CA_VARIABLE,
    SENTINEL_SCHEME,
    SentinelAddress,
    is_sentinel,
    redis_client,
    uses_tls,
)

if TYPE_CHECKING:  # imported by the calls that connect: a URL's parsing needs neither
    import redis
    from celery import Celery

# The broker's password, when it is kept out of SC_BROKER_URL (and of the inventory).
BROKER_PASSWORD_ENV = "SC_BROKER_PASSWORD"
# How long a command waits for Redis before it says it is unreachable (exit 3).
CONNECT_TIMEOUT_S = float(os.environ.get("SC_CONNECT_TIMEOUT", "3"))


def broker_url(url: str | None = None) -> str:
    """The broker URL in force: explicit, else ``SC_BROKER_URL``, else the local cluster
    ``coordinator local --up`` keeps on this machine (said once), else local Redis; with
    ``$SC_BROKER_PASSWORD`` filled in (percent-encoded) when the URL has no password, the
    same way the nodes' URLs get it. ``InvalidJobsError`` for a URL whose password needs
    encoding and has none (it would reach another host, or none)."""
    url = url or os.environ.get("SC_BROKER_URL") or standing() or celeryconfig.broker_url
    check_url(url)
    return with_password(url)


def standing() -> str | None:
    """The broker of the local cluster ``coordinator local --up`` keeps, if one is up."""
    from coordinator.standing import standing_broker

    return standing_broker()


def check_url(url: str) -> None:
    """Refuse a Redis URL whose password holds ``/``, ``?``, ``#`` or a bare ``%``: the URL
    parser would end the host part there and connect elsewhere. A ``sentinel://`` URL is
    checked address by address, and must name at least one Sentinel."""
    if is_sentinel(url):
        try:
            SentinelAddress.parse(url)
        except ValueError as err:
            raise InvalidJobsError(f"the broker URL {redact(url)}: {err}") from None
        for chunk in url.split(";"):
            check_one_url(chunk, url)
        return
    check_one_url(url, url)


def check_one_url(part: str, url: str) -> None:
    parts = urlsplit(part)
    raw_password = parts.netloc.rpartition("@")[0].partition(":")[2]
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment or re.search(
            r"%(?![0-9A-Fa-f]{2})", raw_password):
        raise InvalidJobsError(
            f"the broker URL {redact(url)} has a password with a character that must be "
            f"percent-encoded (/ ? # %): give the password in ${BROKER_PASSWORD_ENV} and the "
            f"URL without it, or encode it (urllib.parse.quote(password, safe=''))")


def with_password(url: str) -> str:
    """``url`` with ``$SC_BROKER_PASSWORD`` filled in when the URL has no password (for
    Sentinels, in the first address: the master's password, as kombu reads it)."""
    if is_sentinel(url):
        first, sep, rest = url.partition(";")
        return with_password(first.replace(SENTINEL_SCHEME, "redis", 1)).replace(
            "redis", SENTINEL_SCHEME, 1) + sep + rest
    password = os.environ.get(BROKER_PASSWORD_ENV)
    parts = urlsplit(url)
    if not password or parts.password is not None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:{quote(password, safe='')}@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))


def tracking_url(url: str | None = None, broker: str | None = None) -> str:
    """Run records live in ``SC_TRACKING_URL`` or, by default, in the broker's Redis."""
    return url or os.environ.get("SC_TRACKING_URL") or broker_url(broker)


def redact(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    return re.sub(r"(://[^:/@;]*:)[^@;]*@", r"\1***@", url)


def connect_tracking(url: str | None = None, broker: str | None = None) -> redis.Redis:
    """A client on the tracking Redis, pinged: raises ``BrokerUnreachableError`` fast."""
    import redis

    target = tracking_url(url, broker)
    client = redis_client(target, socket_connect_timeout=CONNECT_TIMEOUT_S,
                          socket_timeout=CONNECT_TIMEOUT_S * 3)
    try:
        client.ping()
    except (redis.RedisError, OSError) as err:
        raise BrokerUnreachableError(f"cannot reach Redis at {redact(target)}: {err}"
                                     f"{tls_hint(target, err)}") from None
    return client


def tls_hint(url: str, err: Exception) -> str:
    """What a TLS failure most likely means, for the one-line error."""
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (f" (the server's certificate does not verify against "
                f"{os.environ.get(CA_VARIABLE) or 'the system CAs'}: set ${CA_VARIABLE} to "
                f"the CA that signed it)")
    if not uses_tls(url) and ("reset by peer" in text or "Connection closed" in text):
        return " (a TLS-only Redis refuses plain text: use a rediss:// URL)"
    return ""


def publisher(url: str | None = None) -> Celery:
    """The Celery app used to publish jobs (same settings as the workers).

    Its result backend is disabled: the head node reads job states from the
    tracking records, and a Redis backend would subscribe to every task's result
    channel as it is sent. Workers still store results with their own settings.
    With ``$SC_SIGNING_KEY`` it signs every job (``worker_tasks.signing``); a key or
    certificate it cannot use is ``InvalidJobsError`` (exit 2), before anything is sent.
    """
    from worker_tasks.celery_app import make_app
    from worker_tasks.signing import Part, SigningError, register

    app = make_app(broker_url(url))
    app.conf.result_backend = None
    try:
        app.conf.sc_sign_jobs = register(Part.HEAD)
    except SigningError as err:
        raise InvalidJobsError(str(err)) from None
    return app


def check_broker(app: Celery) -> None:
    """Connect once, fast: raises ``BrokerUnreachableError`` instead of retrying for long."""
    url = app.conf.broker_url
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
    except Exception as err:  # kombu raises OperationalError or the transport's own
        raise BrokerUnreachableError(f"cannot reach the broker at {redact(url)}: {err}"
                                     f"{tls_hint(url, err)}") from None


def broker_client(url: str | None = None, socket_timeout: float = 5.0) -> redis.Redis:
    """A client on the broker itself (not the tracking Redis), with an operator's timeouts:
    queue lengths and replication are read where the queues are."""
    return redis_client(broker_url(url), socket_connect_timeout=CONNECT_TIMEOUT_S,
                        socket_timeout=socket_timeout)


def replication_lines(url: str | None = None) -> list[str]:
    """Which Redis the broker is now (behind Sentinels: the master they name) and how far
    its replicas lag."""
    import redis

    from worker_tasks.connections import Replication

    try:
        return Replication.of(broker_client(url)).lines()
    except (redis.RedisError, OSError) as err:
        return [f"{redact(broker_url(url))}: replication unknown ({err})"]


def redis_ca() -> str | None:
    """The CA file the nodes need to verify the broker's TLS certificate, if one is set."""
    return os.environ.get(CA_VARIABLE) or None


# Where kombu keeps the queues bound to the events exchange (one per listening Flower).
EVENT_BINDINGS_KEY = "_kombu.binding.celeryev"


def event_listeners(client: redis.Redis) -> set[bytes]:
    """The queues bound to the events exchange on the broker: one per listening Flower (or
    other consumer of task events)."""
    return set(client.smembers(EVENT_BINDINGS_KEY))
