"""A whole cluster on one machine: a private Redis and one worker per node.

``LocalCluster`` is what ``coordinator local`` and the tests run. Everything it
starts is stopped when the ``with`` block ends: normally, on an error or on
Ctrl-C. Worker logs go to ``<log_dir>/worker-<node>.log``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.die_with_parent import wrapped
from coordinator.errors import ClusterStartError, InvalidJobsError
from coordinator.redis_server import RedisServer
from coordinator.standing import StandingCluster, living, state_path
from worker_tasks import signing
from worker_tasks.connections import redis_client
from worker_tasks.presence import seen_since
from worker_tasks.spec import (
    floating_queue,
    is_floating,
    is_safe_name,
    node_of_queue,
    node_of_slot,
    queue_for,
)
from worker_tasks.spec import worker_name as spec_worker_name
from worker_tasks.tracking import KEY_PREFIX

if TYPE_CHECKING:
    from coordinator.plan import Plan

# How long workers may take to answer a ping after starting (seconds; 2 slow cores).
READY_TIMEOUT_S = 90.0
# Grace for a worker's warm shutdown before it is killed (seconds).
STOP_GRACE_S = 10.0
# How often readiness is looked at while workers start (seconds).
READY_POLL_S = 0.05
# Where a signed local cluster keeps its nodes' own keys (the head's store, ``nodes``,
# holds their certificates only).
NODE_KEYS_DIR = "node-keys"


def worker_command(node: str, loglevel: str = "INFO") -> list[str]:
    """The plain Celery command line of a node's worker (what docs/commands.md shows)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker_tasks", "worker",
        # Its own queue first, then the shared one of floating jobs (kombu rotates them).
        "--queues", f"{queue_for(node)},{floating_queue()}",
        "--concurrency", "1", "--prefetch-multiplier", "1",
        "--task-events", "--hostname", worker_name(node), "--loglevel", loglevel,
        "--without-gossip", "--without-mingle",
    ]


def is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def worker_name(slot: str) -> str:
    """The Celery name of this machine's worker for ``slot``."""
    return spec_worker_name(slot, socket.gethostname())


class LocalCluster:
    """A private Redis plus one Celery worker (concurrency 1) per node.

    Parameters:
        nodes: node labels; each gets a worker on queue ``node.<label>``. A label
            ``<node>.gpu<k>`` is one GPU of a node (per-GPU mode).
        scripts_dir: where workers look up job scripts.
        workdir: where scripts run and relative paths resolve.
        log_dir: where worker logs go (created).
        broker_url: use this Redis instead of starting a private one.
        extra_env: more environment for the workers (e.g. SC_VISIBILITY_TIMEOUT).
        die_with_parent: Redis and the workers die with this process, even a SIGKILLed one
            (``coordinator local`` sets it); start and restart workers from the main thread.
        signed: make a throwaway head key and certificate; the workers trust only it and
            refuse unsigned jobs; they sign their control replies with a throwaway key of
            their own; ``head_env()`` is what a publisher needs to sign and to verify them.
    """

    def __init__(
        self,
        nodes: Iterable[str],
        scripts_dir: str | Path = ".",
        workdir: str | Path = ".",
        log_dir: str | Path | None = None,
        broker_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        die_with_parent: bool = False,
        signed: bool = False,
    ) -> None:
        self.nodes = sorted(set(nodes))
        self.scripts_dir = Path(scripts_dir).resolve()
        self.workdir = Path(workdir).resolve()
        self.log_dir = Path(log_dir or self.workdir / "logs").resolve()
        self.redis: RedisServer | None = None
        self._broker_url = broker_url
        self.extra_env = extra_env or {}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.started_at: dict[str, float] = {}
        self.die_with_parent = die_with_parent
        self.signed = signed
        self.keys_dir: Path | None = None

    @property
    def broker_url(self) -> str:
        if self._broker_url:
            return self._broker_url
        assert self.redis is not None, "cluster not started"
        return self.redis.url

    def head_env(self) -> dict[str, str]:
        """What a process publishing to this cluster sets to sign its jobs (if signed)."""
        if self.keys_dir is None:
            return {}
        return {signing.KEY_VARIABLE: str(self.keys_dir / f"{signing.HEAD_KEY_NAME}.key"),
                signing.CERT_VARIABLE: str(self.keys_dir / f"{signing.HEAD_KEY_NAME}.crt"),
                signing.NODE_CERTS_VARIABLE: str(self.keys_dir / signing.NODE_CERTS_DIR)}

    def worker_env(self, slot: str | None = None) -> dict[str, str]:
        """The environment of ``slot``'s worker (signed: its node's own key)."""
        env = dict(os.environ)
        env.update(self.extra_env)
        if self.keys_dir is not None:
            # The workers trust the head's key and sign their control replies with their
            # node's: one node's key cannot answer for another.
            env.update({signing.TRUST_VARIABLE: str(self.keys_dir / "trusted"),
                        signing.REQUIRE_VARIABLE: "1"})
            env.pop(signing.UNSIGNED_VARIABLE, None)
            env.pop(signing.KEY_VARIABLE, None)
            env.pop(signing.CERT_VARIABLE, None)
            if slot is not None:
                key, cert = self.node_key(node_of_slot(slot))
                env.update({signing.KEY_VARIABLE: str(key), signing.CERT_VARIABLE: str(cert)})
        env.update(
            SC_BROKER_URL=self.broker_url,
            SC_RESULT_BACKEND=self.broker_url,
            SC_TRACKING_URL=self.broker_url,
            SC_SCRIPTS_DIR=str(self.scripts_dir),
            SC_WORKDIR=str(self.workdir),
        )
        return env

    def start(self) -> LocalCluster:
        if not self._broker_url:
            self.redis = RedisServer(die_with_parent=self.die_with_parent).start()
        if self.signed and self.keys_dir is None:
            # In the private Redis's directory, when there is one: it goes with the Redis,
            # even when this process is SIGKILLed.
            parent = self.redis.dir if self.redis is not None else None
            self.keys_dir = Path(tempfile.mkdtemp(prefix="sc-keys-", dir=parent))
            _, cert = signing.make_keypair(self.keys_dir, signing.HEAD_KEY_NAME)
            (self.keys_dir / "trusted").mkdir()
            shutil.copy(cert, self.keys_dir / "trusted" / cert.name)
            (self.keys_dir / signing.NODE_CERTS_DIR).mkdir()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            self.start_worker(node)
        self.wait_ready()
        return self

    def node_key(self, node: str) -> tuple[Path, Path]:
        """``node``'s own key and certificate, made on first use; the head trusts the
        certificate (``nodes/NODE.crt``)."""
        assert self.keys_dir is not None, "an unsigned cluster has no keys"
        key, cert, made = signing.ensure_keypair(self.keys_dir / NODE_KEYS_DIR, node, node)
        if made:
            shutil.copy(cert, self.keys_dir / signing.NODE_CERTS_DIR / f"{node}.crt")
        return key, cert

    def start_worker(self, node: str) -> subprocess.Popen[bytes]:
        self.started_at[node] = time.time()
        command = worker_command(node)
        if self.die_with_parent:  # SIGQUIT: Celery's cold shutdown (its job dies with it)
            command = wrapped(command, signal.SIGQUIT)
        with (self.log_dir / f"worker-{node}.log").open("ab") as log:
            process = subprocess.Popen(
                command, cwd=self.workdir, env=self.worker_env(node),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopping it stops its pool too
            )
        self.workers[node] = process
        return process

    def wait_ready(self, nodes: Iterable[str] | None = None) -> None:
        """Block until every worker is ready; raise if one dies or is too slow.

        A worker announces itself in Redis the moment it is ready to consume (see
        ``worker_tasks.presence``); polling that answers in milliseconds, where a
        ping round waits a whole second for replies.
        """
        chosen = list(nodes or self.nodes)
        wanted = {worker_name(node) for node in chosen}
        since = min(self.started_at.get(node, 0.0) for node in chosen)
        # Presence is kept by node: a per-GPU worker (rig-a.gpu1) is found under rig-a.
        labels = {node_of_queue(queue_for(node)) or node for node in chosen}
        prefix = self.worker_env().get("SC_KEY_PREFIX") or KEY_PREFIX
        client = redis_client(self.broker_url, socket_connect_timeout=5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        try:
            while wanted and time.monotonic() < deadline:
                for node, process in self.workers.items():
                    if process.poll() is not None:
                        raise ClusterStartError(
                            f"worker for node {node} exited with status {process.returncode}; "
                            f"see {self.log_dir / f'worker-{node}.log'}"
                        )
                wanted -= seen_since(client, labels, since, prefix)
                if wanted:
                    time.sleep(READY_POLL_S)
        finally:
            client.close()
        if wanted:
            raise ClusterStartError(
                f"workers {', '.join(sorted(wanted))} did not answer within "
                f"{READY_TIMEOUT_S:g} s; see their logs in {self.log_dir}"
            )

    def stop_workers(self, nodes: Iterable[str], grace: float = STOP_GRACE_S,
                     now: bool = False) -> None:
        """Warm shutdown for all at once, then kill what is left after ``grace``.

        ``now``: kill at once (for idle workers: a warm shutdown only costs a second).
        """
        processes = [self.workers.pop(node) for node in list(nodes) if node in self.workers]
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL if now else signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the pool child, if it outlived its parent
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)

    def kill_worker(self, node: str) -> None:
        """Kill a worker and its running job at once (a node lost mid-job)."""
        process = self.workers.pop(node)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_GRACE_S)

    def stop(self, now: bool = False) -> None:
        """Stop the workers, then Redis; another Ctrl-C (or SIGTERM) cannot cut it short.

        ``now``: the workers are idle (the run is over): kill them without the warm wait.
        """
        held = (signal.SIGINT, signal.SIGTERM)
        previous = ({signum: signal.signal(signum, signal.SIG_IGN) for signum in held}
                    if is_main_thread() else {})
        try:
            self.stop_workers(list(self.workers), now=now)
        finally:
            try:
                if self.redis is not None:
                    self.redis.close()
                    self.redis = None
                if self.keys_dir is not None:  # a throwaway key goes with its cluster
                    shutil.rmtree(self.keys_dir, ignore_errors=True)
                    self.keys_dir = None
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unsigned() -> bool:
    """Whether signing is turned off here (``SC_UNSIGNED=1``): a local run then makes
    no throwaway key."""
    return signing.unsigned()


def warm_env(preload: list[str] | None) -> dict[str, str]:
    """The workers' environment of a warm cluster whose parent imports ``preload``
    (default: numpy and the Step 3 engines)."""
    from worker_tasks.warm import worker_settings

    return worker_settings(preload)


def parse_nodes(text: str | None) -> list[str]:
    """The node labels (or GPU slots) of ``--nodes``, each checked by the node-name rule."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    for name in names:
        if not is_safe_name(name) or is_floating(name):
            raise InvalidJobsError(f"--nodes: {name!r} is not a node name")
    return names


def slots_for(plan: Plan, extra: str | None) -> list[str]:
    """The slots a throwaway cluster starts a worker for: the plan's pinned ones and
    ``--nodes``.

    A floating job needs no slot of its own; with only floating jobs and no ``--nodes``
    there is nothing to run them on.
    """
    wanted = {slot for slot in plan.slots() if not is_floating(node_of_slot(slot))}
    wanted.update(parse_nodes(extra))
    if not wanted:
        raise InvalidJobsError("every job floats and no node is named: give the nodes to run "
                               "them on, e.g. --nodes rig-a,rig-b")
    return sorted(wanted)


# -- a local cluster that stays up (coordinator local --up, --down) -----------------------

# How long ``up`` waits for the supervisor to say its cluster is ready (seconds).
UP_TIMEOUT_S = 120.0
# How long ``down`` waits for the supervisor and all it started to end (seconds).
DOWN_TIMEOUT_S = 60.0
# Default nodes of a cluster started without --nodes.
DEFAULT_NODES = ("rig-a", "rig-b")


def node_list(text: str | None) -> list[str]:
    """``--nodes rig-a,rig-b`` for a cluster that stays up (default: two nodes)."""
    return parse_nodes(text) or list(DEFAULT_NODES)


def standing_cluster() -> StandingCluster | None:
    """The local cluster that is up (``local --up``), or None."""
    return StandingCluster.read()


def keep_up(nodes: Sequence[str], scripts_dir: Path, workdir: Path, warm: bool) -> StandingCluster:
    """``local --up``: start the supervisor (``serve``) in the background and wait until its
    cluster is ready."""
    running = StandingCluster.read()
    if running is not None:
        raise InvalidJobsError(f"a local cluster is up already (pid {running.pid}, "
                               f"{running.broker_url}): coordinator local --down stops it")
    log = state_path().with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "coordinator", "local", "--serve", "--nodes", ",".join(nodes),
            "--scripts-dir", str(scripts_dir), "--workdir", str(workdir),
            "--warm" if warm else "--cold"]
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   close_fds=True)
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        cluster = StandingCluster.read()
        if cluster is not None and cluster.pid == process.pid:
            return cluster
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ClusterStartError(f"the local cluster did not start (exit {process.returncode}"
                                    f"): {' | '.join(tail) or 'no output'} (log {log})")
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    raise ClusterStartError(f"the local cluster was not ready within {UP_TIMEOUT_S:g} s "
                            f"(log {log})")


def serve(nodes: Sequence[str], scripts_dir: Path, workdir: Path,
          worker_env: dict[str, str]) -> int:
    """The supervisor's life: the cluster and Flower up, the state file written, then hold
    them until SIGTERM or SIGINT; everything it started stops with it."""
    from coordinator.redis_server import free_port

    log_dir = state_path().parent / "logs"
    with LocalCluster(list(nodes), scripts_dir, workdir, log_dir=log_dir, extra_env=worker_env,
                      die_with_parent=True) as cluster:
        port = free_port()
        flower = start_flower(cluster.broker_url, port, log_dir)
        # Held from here (the children started with them unheld): the one that stops us
        # is taken by sigwait below.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        StandingCluster(pid=os.getpid(), broker_url=cluster.broker_url, nodes=list(cluster.nodes),
                        flower_url=f"http://127.0.0.1:{port}" if flower else None,
                        scripts_dir=str(cluster.scripts_dir), workdir=str(cluster.workdir),
                        log=str(state_path().with_suffix(".log")),
                        started_at=time.time(),
                        processes=[process.pid for process in (
                            cluster.redis.process if cluster.redis else None, flower,
                            *cluster.workers.values()) if process is not None]).write()
        try:
            received = signal.sigwait({signal.SIGTERM, signal.SIGINT})
            print(f"local cluster: stopping ({signal.Signals(received).name})", flush=True)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
            state_path().unlink(missing_ok=True)
            if flower is not None:
                flower.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    flower.wait(timeout=15)
                if flower.poll() is None:
                    flower.kill()
            cluster.stop(now=True)
    return 0


def start_flower(broker_url: str, port: int, log_dir: Path) -> subprocess.Popen[bytes] | None:
    """Flower on 127.0.0.1:``port`` (loopback: no password), dying with this process; None
    where Flower is not installed."""
    import importlib.util

    from coordinator.die_with_parent import wrapped

    if importlib.util.find_spec("flower") is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SC_BROKER_URL=broker_url, FLOWER_UNAUTHENTICATED_API="true")
    command = [sys.executable, "-m", "celery", "-A", "worker_tasks", "flower",
               "--address=127.0.0.1", f"--port={port}"]
    with (log_dir / "flower.log").open("ab") as out:
        return subprocess.Popen(wrapped(command, signal.SIGTERM), env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def take_down(timeout: float = DOWN_TIMEOUT_S) -> str:
    """``local --down``: stop the cluster that is up (its supervisor, and so all it started),
    leaving no process and no directory; one line."""
    cluster = StandingCluster.read()
    if cluster is None:
        return "no local cluster is up"
    with contextlib.suppress(ProcessLookupError):
        os.kill(cluster.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (cluster.alive() or living(cluster.processes)):
        time.sleep(0.1)
    for pid in ([cluster.pid] if cluster.alive() else []) + living(cluster.processes):
        with contextlib.suppress(ProcessLookupError):  # not stopped in time: killed
            os.kill(pid, signal.SIGKILL)
    state_path().unlink(missing_ok=True)
    # Its log and the workers' logs go too: nothing of it is left (the runs' own logs stay
    # in their output directories).
    shutil.rmtree(state_path().parent / "logs", ignore_errors=True)
    state_path().with_suffix(".log").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # its directory too, unless something else is there
        state_path().parent.rmdir()
    return f"stopped the local cluster (pid {cluster.pid}, {cluster.broker_url})"
