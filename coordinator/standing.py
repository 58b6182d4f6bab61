"""A local cluster that stays up: ``coordinator local --up``, ``--status``, ``--down``.

``local --jobs-file J`` starts a throwaway cluster and stops it when its run ends; a
pipeline step that calls ``submit()`` needs one that is there before it and after it. ``up``
starts a supervisor in a session of its own (``serve``): it runs a ``LocalCluster`` (a
private Redis on a free loopback port, a worker per node) and Flower, writes the state file,
and holds them until it is told to stop; everything it started dies with it
(``die_with_parent``), its Redis's directory included.

While it is up, every command and the Python API on this machine use it whenever no broker
is named (``broker.broker_url``), and say so once. The state file is
``$SC_LOCAL_STATE``, else ``$XDG_STATE_HOME/scripts-coordinator/local-cluster.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from coordinator.errors import ClusterStartError, InvalidJobsError

STATE_VARIABLE = "SC_LOCAL_STATE"
# How long ``up`` waits for the supervisor to say its cluster is ready (seconds).
UP_TIMEOUT_S = 120.0
# How long ``down`` waits for the supervisor and all it started to end (seconds).
DOWN_TIMEOUT_S = 60.0
# Default nodes of a cluster started without --nodes.
DEFAULT_NODES = ("rig-a", "rig-b")


def state_path() -> Path:
    configured = os.environ.get(STATE_VARIABLE)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "scripts-coordinator" / "local-cluster.json"


@dataclass(frozen=True)
class StandingCluster:
    """What ``local --up`` started, as its state file says.

    Parameters:
        pid: the supervisor's pid (its session holds everything it started).
        broker_url: the private Redis (``redis://127.0.0.1:PORT/0``).
        nodes: the nodes (or GPU slots) it runs a worker for.
        flower_url: Flower's address, or None when Flower could not start.
        scripts_dir, workdir: the workers' directories.
        log: the supervisor's log (workers' logs beside it).
        started_at: when it became ready (seconds since the epoch).
        processes: the pids it started (Redis, the workers, Flower): ``down`` waits for each.
    """

    pid: int
    broker_url: str
    nodes: list[str]
    flower_url: str | None
    scripts_dir: str
    workdir: str
    log: str
    started_at: float
    processes: list[int]

    @classmethod
    def read(cls) -> StandingCluster | None:
        """The cluster that is up, or None (no state file, or its supervisor is gone: the
        stale file is removed)."""
        path = state_path()
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            cluster = cls(**fields)
        except (OSError, ValueError, TypeError):
            return None
        if not cluster.alive():
            path.unlink(missing_ok=True)
            return None
        return cluster

    def alive(self) -> bool:
        return bool(living([self.pid]))

    def write(self) -> None:
        path = state_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def lines(self) -> list[str]:
        """Where each part is, and how to stop it."""
        return [f"broker   {self.broker_url} (every command here uses it when no broker is "
                f"named)",
                f"workers  {', '.join(self.nodes)} (scripts {self.scripts_dir}, workdir "
                f"{self.workdir})",
                f"flower   {self.flower_url or 'not started (see the log)'}",
                f"log      {self.log}",
                f"stop     coordinator local --down (pid {self.pid})"]


def up(nodes: Sequence[str], scripts_dir: Path, workdir: Path, warm: bool) -> StandingCluster:
    """Start the supervisor in the background and wait until its cluster is ready."""
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
    from coordinator.local import LocalCluster
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


def down(timeout: float = DOWN_TIMEOUT_S) -> str:
    """Stop the cluster that is up (its supervisor, and so all it started); one line."""
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


def living(pids: Sequence[int]) -> list[int]:
    """Those of ``pids`` still running (not zombies)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


_said: list[str] = []  # the standing cluster's URL, once this process said it uses it


def standing_broker() -> str | None:
    """The broker of the cluster ``local --up`` started on this machine, if one is up; said
    once per process (stderr), so a user knows where the jobs go."""
    cluster = StandingCluster.read()
    if cluster is None:
        return None
    if not _said:
        _said.append(cluster.broker_url)
        print(f"coordinator: using the local cluster at {cluster.broker_url} (coordinator local "
              f"--up; no broker named: --broker URL or $SC_BROKER_URL names another)",
              file=sys.stderr, flush=True)
    return cluster.broker_url
