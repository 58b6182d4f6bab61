"""Not collected by the suite (no ``test_`` prefix): ``test_newcomer`` runs it in a pytest of
its own and interrupts that pytest while this test holds the session's Redis and workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import redis

from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer

# How long the test holds the cluster if nobody interrupts it (seconds).
HOLD_S = 120.0


def test_hold_the_cluster_until_interrupted(redis_server: RedisServer,
                                            cluster: LocalCluster) -> None:
    server_pid = redis.Redis.from_url(redis_server.url).info()["process_id"]
    Path(os.environ["SC_TEST_PIDS"]).write_text(json.dumps({
        "redis": server_pid, "workers": [process.pid for process in cluster.workers.values()]}))
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
