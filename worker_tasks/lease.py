"""One job at a time per slot, enforced in the data: a lease in Redis per slot.

A slot is a node, or one GPU of it in per-GPU runs (``rig-a.gpu1``).

Concurrency 1 and one worker per node are configuration; a pool grown from
Flower, ``--autoscale`` or a second worker started with ``--force`` would
break them. So before a job starts, its worker takes the node's lease (a
Redis key set only if absent, with a time to live) and keeps it alive while
the job runs; a second process for the same node waits for it. A worker that
dies stops renewing, and the lease expires on its own.

Parameters (environment):
    SC_LEASE_TTL     seconds a lease lives without renewal (default 30)
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from worker_tasks.tracking import lease_key

logger = logging.getLogger(__name__)

LEASE_TTL_S = float(os.environ.get("SC_LEASE_TTL", "30"))
# Renew this often: three renewals may fail before the lease can expire.
RENEW_EVERY_S = LEASE_TTL_S / 3
# How often a waiting process tries again (seconds).
WAIT_POLL_S = 0.25

# Renew only our own lease; take it back if Redis lost it (a restart without persistence).
RENEW_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 2 end
return 0
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def make_token(host: str, task_id: str) -> str:
    """Who holds a lease: ``<worker name>/<pid>/<task id>`` (parsed by ``parse_token``)."""
    return f"{host}/{os.getpid()}/{task_id}"


def parse_token(token: str) -> tuple[str, str, str]:
    """(worker name, pid, task id) of a lease token; empty parts where it is malformed."""
    host, _, rest = token.partition("/")
    pid, _, task_id = rest.partition("/")
    return host, pid, task_id


def task_of_token(token: str) -> str:
    """The task id of the attempt that holds a lease."""
    return parse_token(token)[2]


def task_holding(client: redis.Redis, slot: str) -> str | None:
    """The task id of the attempt that holds ``slot``'s lease, or None when nobody does."""
    token = client.get(lease_key(slot))
    return task_of_token(token.decode(errors="replace")) if token is not None else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlotLease:
    """The lease of one slot (a node, or one GPU of it), held by one job attempt.

    ``token`` says whose. Parameters:
        client: the tracking Redis.
        slot: the node label, or ``<node>.gpu<k>`` for one GPU of it (per-GPU mode).
        host: this worker's name (``rig-a@machine``).
        task_id: the job's message id.
    """

    def __init__(self, client: redis.Redis, slot: str, host: str, task_id: str) -> None:
        self.client = client
        self.key = lease_key(slot)
        self.slot = slot
        self.host = host
        self.token = make_token(host, task_id)
        self.ttl_ms = int(LEASE_TTL_S * 1000)
        self._renew = client.register_script(RENEW_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Wait until the lease is ours (True), or ``give_up()`` says to stop (False)."""
        said = False
        while True:
            if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                self._start_renewing()
                return True
            holder = self.client.get(self.key)
            if holder is not None and self.break_if_dead(holder):
                continue
            if not said:
                logger.warning("node %s is busy (lease held by %s): waiting", self.slot,
                               holder.decode() if holder else "?")
                said = True
            if give_up():
                return False
            time.sleep(WAIT_POLL_S)

    def break_if_dead(self, holder: bytes) -> bool:
        """Free a lease left by a killed process of this same worker (same machine)."""
        host, pid, _ = parse_token(holder.decode(errors="replace"))
        if host != self.host or not pid.isdigit() or pid_alive(int(pid)):
            return False
        logger.warning("node %s: freeing the lease of dead process %s (%s)", self.slot, pid,
                       holder.decode(errors="replace"))
        return bool(self._release(keys=[self.key], args=[holder]))

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.slot}",
                                        daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                if not self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
                    logger.error("node %s: lease taken by another process while job %s runs",
                                 self.slot, self.token)
            except redis.RedisError as err:  # renewals go on; the TTL covers short outages
                logger.warning("node %s: lease renewal failed: %s", self.slot, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[self.key], args=[self.token])
