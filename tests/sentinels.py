"""A highly available broker on loopback: one master, one replica, three Sentinels.

Debian's ``redis-server`` runs a Sentinel with ``--sentinel``. The Sentinels watch the
master under ``celeryconfig``'s master name and promote the replica once two of them
agree it has been down for ``DOWN_AFTER_MS``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

import celeryconfig
from coordinator.redis_server import RedisServer, find_redis_server, free_port

# How long a silent master counts as up (milliseconds): short, for a quick failover.
DOWN_AFTER_MS = 1000
# Sentinels that must agree the master is down.
QUORUM = 2
# How long a Sentinel may take to start and to see the replica (seconds).
START_TIMEOUT_S = 60.0


class SentinelGroup:
    """The master, its replica and three Sentinels; ``url`` names the Sentinels."""

    def __init__(self, sentinels: int = 3) -> None:
        self.master = RedisServer(persistent=True)
        self.replica = RedisServer(persistent=True, replica_of=self.master.port)
        self.ports = [free_port() for _ in range(sentinels)]
        self.dir = Path(tempfile.mkdtemp(prefix="sc-sentinel-"))
        self.processes: list[subprocess.Popen[bytes]] = []
        self.name = celeryconfig.sentinel_master_name()

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.ports) + "/0"

    def start(self) -> SentinelGroup:
        self.master.start()
        self.replica.start()
        self.wait_until(self.replica_in_sync, "the replica to sync with the master")
        for port in self.ports:
            conf = self.dir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.name} 10000\n"
                f"sentinel parallel-syncs {self.name} 1\n"
                # Known from the start: else each Sentinel finds it by the master's INFO,
                # sent every 10 s, which a loaded machine can push past the start timeout.
                f"sentinel known-replica {self.name} 127.0.0.1 {self.replica.port}\n")
            log = (self.dir / f"sentinel-{port}.log").open("ab")
            self.processes.append(subprocess.Popen(
                [find_redis_server(), str(conf), "--sentinel"], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
        self.wait_until(lambda: all(self.sees_replica(port) for port in self.ports),
                        "every Sentinel to see the master and its replica")
        return self

    def replica_in_sync(self) -> bool:
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis(port=self.replica.port, socket_timeout=1)
            return client.info("replication").get("master_link_status") == "up"
        return False

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1,
                           socket_connect_timeout=1, decode_responses=True)

    def sees_replica(self, port: int) -> bool:
        with contextlib.suppress(redis.RedisError):
            replicas = self.sentinel(port).sentinel_slaves(self.name)
            return any(int(entry["port"]) == self.replica.port and "s_down" not in
                       entry["flags"] for entry in replicas)
        return False

    def master_port(self) -> int | None:
        for port in self.ports:
            with contextlib.suppress(redis.RedisError):
                return int(self.sentinel(port).sentinel_get_master_addr_by_name(self.name)[1])
        return None

    def wait_until(self, condition: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if condition():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.replica.close()
        self.master.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelGroup:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
