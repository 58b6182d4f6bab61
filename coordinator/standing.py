"""The local cluster that stays up (``coordinator local --up``): its state file, and finding it.

``coordinator.local`` starts and stops it (``keep_up``, ``serve``, ``take_down``); this module
only reads and writes what it left: where its broker is, its workers, Flower, its pids. While
it is up, every command and the Python API on this machine use it whenever no broker is named
(``broker.broker_url`` asks ``standing_broker``), and say so once. The state file is
``$SC_LOCAL_STATE``, else ``$XDG_STATE_HOME/scripts-coordinator/local-cluster.json``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_VARIABLE = "SC_LOCAL_STATE"


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
        """Its supervisor lives: that pid, and still ``coordinator local --serve`` (after a
        reboot the number may belong to another program)."""
        from worker_tasks.daemon import process_matches

        return process_matches(self.pid, "--serve")

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
