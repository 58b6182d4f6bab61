"""This machine's worker for one node (or one GPU of it), as the ``worker`` verb runs it.

``NodeWorker`` owns the node side of a worker's life: which slot it serves, its pid and log
files, the trust it needs before it may start, the refusal of a second worker for the same
GPUs, a start in the foreground (exec) or detached (returns once it announces itself), its
status and its stop. The CLI parses and prints; the decisions are here.
"""

from __future__ import annotations

import glob
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.broker import broker_url, check_broker, connect_tracking, publisher
from coordinator.errors import ClusterStartError, InvalidJobsError, NodeFailedError
from coordinator.local import READY_TIMEOUT_S, worker_command, worker_name
from worker_tasks import daemon
from worker_tasks.daemon import STATE_DIR
from worker_tasks.spec import (
    MAX_GPU_ID,
    gpu_of_slot,
    is_floating,
    is_safe_name,
    node_of_slot,
    queue_for,
    slot_of,
    slot_of_worker,
)

# Lines of the worker's log quoted when it dies at start.
LOG_TAIL_LINES = 5
# How often a starting worker is looked for in the presence registry (seconds).
PING_INTERVAL_S = 0.5
# How long a worker listed as serving the node has to answer the ping that proves it
# alive (seconds).
PING_TIMEOUT_S = 1.0


def load_env_file(path: str) -> None:
    """``KEY=VALUE`` lines (systemd's EnvironmentFile, unquoted) into this environment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidJobsError(f"--env-file {path}: {err.strerror or err}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise InvalidJobsError(f"--env-file {path}: line {number} is not NAME=VALUE")
        os.environ[name.strip()] = value


def log_tail(logfile: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = logfile.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def gpu_index(slot: str) -> int:
    """Sort key: the whole node (-1) first, then its GPUs by number (gpu2 before gpu10)."""
    gpu = gpu_of_slot(slot)
    return -1 if gpu is None else gpu


@dataclass
class NodeWorker:
    """The worker of ``node`` (or of its GPU ``gpu``) on this machine.

    Parameters:
        node: the node label jobs name (``rig-a``); checked by the node-name rule.
        gpu: per-GPU mode: the GPU it serves, else None (the whole node).
        workdir: where scripts run; its ``.scripts-coordinator/`` holds pid and log files.
        pidfile, logfile: given paths, else ``WORKDIR/.scripts-coordinator/worker-SLOT.*``.
    """

    node: str
    gpu: int | None
    workdir: Path
    pidfile: Path | None = None
    logfile: Path | None = None
    slot: str = field(init=False)

    def __post_init__(self) -> None:
        if not is_safe_name(self.node):
            raise InvalidJobsError(f"--node {self.node!r}: use letters, digits, '.', '_', '-'")
        if is_floating(self.node):
            raise InvalidJobsError(f"--node {self.node}: reserved for floating jobs (every "
                                   f"worker takes them); name the node itself, e.g. --node "
                                   f"rig-a")
        if self.gpu is not None and not 0 <= self.gpu <= MAX_GPU_ID:  # per-GPU mode
            raise InvalidJobsError(f"--gpu {self.gpu}: give a GPU index in 0..{MAX_GPU_ID}")
        # What this worker serves one job at a time: the node, or one GPU of it.
        self.slot = slot_of(self.node, self.gpu)

    def files(self, slot: str | None = None) -> tuple[Path, Path]:
        """(pid file, log file) of ``slot`` (default: this worker's)."""
        slot = slot or self.slot
        state = self.workdir / STATE_DIR
        if slot == self.slot:
            return (self.pidfile or state / f"worker-{slot}.pid",
                    self.logfile or state / f"worker-{slot}.log")
        return state / f"worker-{slot}.pid", state / f"worker-{slot}.log"

    def node_slots(self) -> dict[str, tuple[Path, Path]]:
        """slot -> (pid file, log file) of the workers ``--status``/``--stop`` act on: this
        one's with ``--gpu`` or ``--pidfile``; else every worker of the node with a pid file
        under the workdir (the whole node's first, then its GPUs in order), or the whole
        node's alone when there is none."""
        if self.gpu is not None or self.pidfile:
            return {self.slot: self.files()}
        slots = {}
        for path in (self.workdir / STATE_DIR).glob(f"worker-{glob.escape(self.node)}*.pid"):
            slot = path.name.removeprefix("worker-").removesuffix(".pid")
            if node_of_slot(slot) == self.node:
                slots[slot] = (path, path.with_suffix(".log"))
        if not slots:
            return {self.slot: self.files()}
        return dict(sorted(slots.items(), key=lambda item: gpu_index(item[0])))

    def status(self, version: str) -> dict[str, Any]:
        """The node's workers as one JSON-able object: each one's pid file state, and what the
        node has (version, Python, the fastest scoring engine it can use)."""
        from scoring.backends import best_engine

        workers = []
        for slot, (pidfile, logfile) in self.node_slots().items():
            state = daemon.read_pidfile(pidfile, queue_for(slot))
            workers.append({"slot": slot, "pid": state.pid, "alive": state.alive,
                            "stale": state.stale, "worker_name": worker_name(slot),
                            "pidfile": str(pidfile), "logfile": str(logfile)})
        return {"node": self.node, "workers": workers, "hostname": socket.gethostname(),
                "version": version, "python": sys.executable, "engine": best_engine()}

    def stop(self, now: bool, timeout: float) -> list[str]:
        """Stop the workers of ``node_slots``: one line each, prefixed by its slot when there
        are several (exit 6 when one does not stop within ``timeout``)."""
        slots = self.node_slots()
        try:
            lines = daemon.stop_all([(files[0], queue_for(slot)) for slot, files in
                                     slots.items()], now=now, timeout=timeout)
        except TimeoutError as err:
            raise NodeFailedError(str(err)) from None
        return [line if len(slots) == 1 else f"{slot}: {line}"
                for slot, line in zip(slots, lines, strict=True)]

    def make_key(self) -> tuple[Path, Path, bool]:
        """The node's own key, made here if absent (never copied off the node):
        (key, certificate, made)."""
        from worker_tasks.signing import ensure_node_key

        return ensure_node_key(self.workdir / STATE_DIR, self.node)

    def running(self) -> daemon.PidFileState:
        """What this worker's pid file says (alive, stale, or no file)."""
        return daemon.read_pidfile(self.files()[0], queue_for(self.slot))

    def check_trust(self, trusted_certs: str | None, require_signed: bool) -> None:
        """A worker that must run only signed jobs has a trust store it can read (exit 2)."""
        from worker_tasks import signing

        if trusted_certs:
            os.environ[signing.TRUST_VARIABLE] = str(Path(trusted_certs).resolve())
        if require_signed:
            os.environ[signing.REQUIRE_VARIABLE] = "1"
        if signing.flag(signing.REQUIRE_VARIABLE) and signing.trust_store() is None:
            raise InvalidJobsError(
                f"node {self.slot}: signed jobs are required but there is no trust store: "
                f"give --trusted-certs DIR (the head's certificate; cluster deploy installs "
                f"it), or set {signing.UNSIGNED_VARIABLE}=1 to run unsigned jobs deliberately")
        try:
            signing.register(signing.Part.WORKER)
        except signing.SigningError as err:
            raise InvalidJobsError(f"node {self.slot}: {err}") from None

    def check_alone(self, broker: str | None, force: bool) -> None:
        """Refuse a second worker for the same GPUs (exit 2) unless ``force``: the broker is
        reached first (exit 3)."""
        app = publisher(broker)
        check_broker(app)
        others = self.others(broker, app)
        if others and not force:
            mode = ("a second worker would run its jobs in parallel (one at a time per node)"
                    if all(slot_of_worker(name) == self.slot for name in others) else
                    "per-node and per-GPU workers of one node would run jobs on the same GPUs "
                    "at once (stop the other kind first)")
            raise InvalidJobsError(f"node {self.slot} is already served by {', '.join(others)}"
                                   f": {mode}; --force starts it anyway")

    def others(self, broker: str | None, app: Any) -> list[str]:
        """The workers serving this slot already, or the same GPUs by the other mode (a
        whole-node worker beside per-GPU ones would run jobs on one GPU at once), by the
        presence registry (one read, at any width). The other GPUs' workers of the node are
        no second worker of this one. A killed worker stays listed for ``PRESENCE_TTL_S``:
        one ping to the names listed settles which are alive."""
        from worker_tasks.presence import serving

        whole = gpu_of_slot(self.slot) is None
        names = [name for name in
                 serving(connect_tracking(None, broker), [self.node]).get(self.node, [])
                 if slot_of_worker(name) == self.slot
                 or whole != (gpu_of_slot(slot_of_worker(name)) is None)]
        if not names:
            return []
        answered = {name for reply in
                    app.control.ping(destination=names, timeout=PING_TIMEOUT_S)
                    for name in reply}
        return [name for name in names if name in answered]

    def environment(self, broker: str | None, scripts_dir: Path,
                    worker_env: dict[str, str]) -> dict[str, str]:
        """What the worker's process is started with, beside this one's environment."""
        return {"SC_BROKER_URL": broker_url(broker), **worker_env,
                "SC_SCRIPTS_DIR": str(scripts_dir.resolve()),
                "SC_WORKDIR": str(self.workdir.resolve())}

    def command(self, loglevel: str) -> list[str]:
        return worker_command(self.slot, loglevel)

    def exec_here(self, command: list[str]) -> None:
        """Become the worker (signals go to it): the pid file, when given, keeps this pid."""
        os.chdir(self.workdir)
        if self.pidfile:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            self.pidfile.write_text(f"{os.getpid()}\n")  # exec keeps the pid
        if self.logfile:
            self.logfile.parent.mkdir(parents=True, exist_ok=True)
            log_fd = os.open(self.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
        os.execv(sys.executable, command)

    def start_detached(self, command: list[str], broker: str | None) -> str:
        """Start the worker in its own session and wait until it announces itself (or dies):
        the line that says so."""
        from worker_tasks.presence import seen_since

        pidfile, logfile = self.files()
        started = time.time()
        process = daemon.start_detached(command, os.environ, self.workdir.resolve(), pidfile,
                                        logfile)
        name = worker_name(self.slot)
        tracking = connect_tracking(None, broker)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pidfile.unlink(missing_ok=True)
                tail = "\n".join(f"  {line}" for line in log_tail(logfile))
                raise ClusterStartError(f"worker died at start (exit status "
                                        f"{process.returncode}); last lines of {logfile}:\n"
                                        f"{tail}")
            # Ready once it announces itself (presence): one Redis read, not a ping to all.
            if name in seen_since(tracking, [self.node], started):
                return f"started worker {name} (pid {process.pid}, log {logfile})"
            time.sleep(PING_INTERVAL_S)
        raise ClusterStartError(f"worker pid {process.pid} did not answer within "
                                f"{READY_TIMEOUT_S:g} s; see {logfile}")
