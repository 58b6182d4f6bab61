"""Redis clients from a URL: one server, or the master that Redis Sentinel names.

Every Redis URL the project takes (broker, results, tracking; head node and workers)
goes through ``redis_client``, so each accepts the same forms:

* ``redis://[:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path``: one server;
* ``sentinel://[:password@]host:port;sentinel://host:port;.../db``: the Sentinels that
  watch the master named by ``$SC_SENTINEL_MASTER`` (default ``mymaster``), as kombu and
  Celery read it. The client asks a Sentinel for the master before each new connection,
  so after a failover its next command reaches the promoted replica (a demoted master's
  ``READONLY`` becomes a connection error that makes it ask again).

The password (and user) of the first address is the master's; Sentinels are asked
without one unless ``$SC_SENTINEL_PASSWORD`` is set.

TLS (``rediss://``): the server's certificate is verified against ``$SC_REDIS_CA`` (else
the system's CAs); ``$SC_REDIS_CERT`` and ``$SC_REDIS_KEY`` give a client certificate
where the server asks for one. ``tls_options`` is the same for redis-py, kombu and the
result backend.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import celeryconfig

if TYPE_CHECKING:
    import redis

SENTINEL_SCHEME = "sentinel"
TLS_SCHEME = "rediss"
# The CA that signed the Redis server's certificate; a client certificate and its key.
CA_VARIABLE, CERT_VARIABLE, KEY_VARIABLE = "SC_REDIS_CA", "SC_REDIS_CERT", "SC_REDIS_KEY"
# A Sentinel's port when an address gives none.
DEFAULT_SENTINEL_PORT = 26379


def is_sentinel(url: str) -> bool:
    return url.split(":", 1)[0].lower() == SENTINEL_SCHEME


def uses_tls(url: str) -> bool:
    return url.split(":", 1)[0].lower() == TLS_SCHEME


def tls_options() -> dict[str, Any]:
    """How to verify a ``rediss://`` server, and the client certificate to show it."""
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    for setting, variable in (("ssl_ca_certs", CA_VARIABLE), ("ssl_certfile", CERT_VARIABLE),
                              ("ssl_keyfile", KEY_VARIABLE)):
        if os.environ.get(variable):
            options[setting] = os.environ[variable]
    return options


def sentinel_master() -> str:
    """The name of the master the Sentinels watch (``$SC_SENTINEL_MASTER``)."""
    return celeryconfig.sentinel_master_name()


@dataclass(frozen=True)
class SentinelAddress:
    """What a ``sentinel://`` URL says: the Sentinels, and how to talk to the master."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        """``ValueError`` with one line for a URL that names no usable Sentinel."""
        sentinels: list[tuple[str, int]] = []
        db, username, password = 0, None, None
        for index, chunk in enumerate(part for part in url.split(";") if part.strip()):
            parts = urlsplit(chunk.strip())
            if parts.scheme.lower() != SENTINEL_SCHEME or not parts.hostname:
                raise ValueError(f"{chunk.strip()!r} is not a sentinel://host:port address")
            try:
                port = parts.port or DEFAULT_SENTINEL_PORT
            except ValueError:
                raise ValueError(f"{chunk.strip()!r} has no valid port") from None
            sentinels.append((parts.hostname, port))
            if index == 0:
                username = unquote(parts.username) if parts.username else None
                password = unquote(parts.password) if parts.password is not None else None
            path = parts.path.strip("/")
            if path:
                if not path.isdigit():
                    raise ValueError(f"{chunk.strip()!r}: the database must be a number")
                db = int(path)
        if not sentinels:
            raise ValueError("a sentinel:// URL must name at least one Sentinel")
        return cls(tuple(sentinels), db, username, password)


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client on ``url``'s Redis (the current master, for a ``sentinel://`` URL).

    ``options``: connection settings for ``redis.Redis`` (``socket_timeout``, ...); they
    apply to the Sentinels too, so a dead Sentinel costs one timeout, not a hang.
    """
    import redis

    if not is_sentinel(url):
        if uses_tls(url):
            options = {**tls_options(), **options}
        return redis.Redis.from_url(url, **options)
    from redis.sentinel import Sentinel

    address = SentinelAddress.parse(url)
    sentinel = Sentinel(list(address.sentinels), sentinel_kwargs=sentinel_kwargs(options),
                        **options)
    return sentinel.master_for(sentinel_master(), db=address.db, username=address.username,
                               password=address.password)


def sentinel_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """How to talk to the Sentinels themselves: the clients' timeouts, their password."""
    kwargs = {name: value for name, value in options.items()
              if name in ("socket_timeout", "socket_connect_timeout")}
    password = celeryconfig.sentinel_password()
    if password:
        kwargs["password"] = password
    return kwargs


@dataclass(frozen=True)
class Replica:
    address: str
    state: str
    lag_s: float
    behind_bytes: int


@dataclass(frozen=True)
class Replication:
    """Which Redis a client's commands reach now, and how far its replicas lag behind it."""

    address: str
    role: str
    replicas: tuple[Replica, ...]
    sentinel_master: str | None = None

    @classmethod
    def of(cls, client: redis.Redis) -> Replication:
        info = client.info("replication")
        offset = int(info.get("master_repl_offset", 0))
        replicas = tuple(
            Replica(f"{value.get('ip')}:{value.get('port')}", str(value.get("state", "?")),
                    float(value.get("lag", 0)), max(offset - int(value.get("offset", 0)), 0))
            for name, value in sorted(info.items())
            if name.startswith("slave") and isinstance(value, dict))
        pool = client.connection_pool
        if hasattr(pool, "get_master_address"):  # a Sentinel-managed pool
            host, port = pool.get_master_address()
            return cls(f"{host}:{port}", str(info.get("role", "?")), replicas,
                       getattr(pool, "service_name", None))
        kwargs = pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return cls(str(where), str(info.get("role", "?")), replicas)

    def lines(self) -> list[str]:
        """For ``cluster status``: the master, then a line per replica."""
        kind = (f"Sentinel master {self.sentinel_master!r}" if self.sentinel_master
                else "Redis")
        first = f"{kind} at {self.address} ({self.role}), {len(self.replicas)} replica(s)"
        if not self.replicas:
            first += ": a single copy of the queues and records"
        return [first] + [f"  replica {replica.address} {replica.state}, lag "
                          f"{replica.lag_s:g} s, {replica.behind_bytes} bytes behind"
                          for replica in self.replicas]
