"""Warm jobs: the worker keeps a zygote (``zygote.py``) and forks each job's interpreter
from it, its heavy imports already done.

Opt-in per worker (``coordinator worker --warm``, which sets ``SC_WARM``) and per job (the
``warm`` field; default: the worker's setting). The worker's main process starts the
zygote at worker start and keeps it (``Supervisor``, a thread): a preload that fails is
one log line and jobs then run cold; a zygote that dies is restarted, saying so. The pool
process asks it for each job (``WarmRunner``, the cold ``Runner``'s interface: ``wait``,
``kill``); when it cannot answer, the job runs cold and its log says why.

Parameters (environment, set by ``coordinator worker``):
    SC_WARM       1: jobs run warm unless they say ``"warm": false``
    SC_PRELOAD    modules the zygote imports (comma-separated; default ``DEFAULT_PRELOAD``)
    SC_WARM_SOCKET  (set by the worker) where its zygote listens
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from worker_tasks.runner import STATUS_READ_BYTES, JobProcess, Outcome, outcome_of

logger = logging.getLogger(__name__)

WARM_VARIABLE = "SC_WARM"
PRELOAD_VARIABLE = "SC_PRELOAD"
SOCKET_VARIABLE = "SC_WARM_SOCKET"
# The Step 3 script's engines: NumPy, the Numba-compiled loops loaded, CuPy (where installed).
DEFAULT_PRELOAD = ("numpy", "scoring.warm_engines")
# How long the zygote may take to import its modules and answer (seconds).
READY_TIMEOUT_S = 300.0
# A zygote that dies this many times within RESTART_WINDOW_S is not restarted again.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# How long a job waits for the zygote to fork it (seconds; a job that comes while the zygote
# still imports waits for it); then it runs cold.
REQUEST_TIMEOUT_S = 120.0
# A job whose env sets one of these runs cold: preloaded modules read them at import.
IMPORT_TIME_ENV = re.compile(r"(OMP|MKL|OPENBLAS|NUMEXPR|NUMBA)_")


class WarmUnavailable(OSError):
    """The zygote could not start this job; it runs cold (the text says why)."""


def worker_settings(preload: Sequence[str] | None = None) -> dict[str, str]:
    """The environment that makes a worker run its jobs warm (``coordinator worker --warm``):
    with ``preload`` given, those modules instead of ``DEFAULT_PRELOAD``."""
    settings = {WARM_VARIABLE: "1"}
    if preload is not None:
        settings[PRELOAD_VARIABLE] = ",".join(preload)
    return settings


def enabled() -> bool:
    return os.environ.get(WARM_VARIABLE, "") not in ("", "0", "false", "no")


def preload_modules() -> list[str]:
    given = os.environ.get(PRELOAD_VARIABLE)
    if given is None:
        return list(DEFAULT_PRELOAD)
    return [name.strip() for name in given.split(",") if name.strip()]


def cold_reason(env: Mapping[str, str]) -> str | None:
    """Why a job with these extra env variables must run cold, or None."""
    names = sorted(name for name in env if IMPORT_TIME_ENV.match(name))
    if names:
        return (f"its env sets {', '.join(names)}, which preloaded modules read at import: "
                f"ran cold")
    return None


class Supervisor:
    """The worker's zygote: started, watched and restarted from one thread of the main
    process (the zygote dies with that process, even SIGKILLed: its death signal).

    Parameters:
        modules: what the zygote imports before serving.
        env: its environment (the worker's, without the broker's secrets).
    """

    def __init__(self, modules: Sequence[str], env: Mapping[str, str]) -> None:
        self.modules = list(modules)
        self.env = dict(env)
        self.directory = tempfile.mkdtemp(prefix="sc-warm-")  # mode 0700
        self.socket_path = os.path.join(self.directory, "zygote.sock")
        self.process: subprocess.Popen[str] | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.keep, name="sc-zygote", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def keep(self) -> None:
        """Start the zygote, and again each time it dies, until the worker stops."""
        deaths: list[float] = []
        while not self.stopping.is_set():
            if not self.launch():
                return
            assert self.process is not None
            status = self.process.wait()
            if self.stopping.is_set():
                return
            deaths = [moment for moment in deaths if time.monotonic() - moment
                      < RESTART_WINDOW_S] + [time.monotonic()]
            if len(deaths) > MAX_RESTARTS:
                logger.error("warm: the zygote died %d times within %.0f s; jobs run cold",
                             len(deaths), RESTART_WINDOW_S)
                return
            logger.warning("warm: the zygote (pid %d) died (status %s); restarting it",
                           self.process.pid, status)

    def launch(self) -> bool:
        """Start one zygote and wait for its report; False if it cannot serve."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker_tasks.zygote", self.socket_path,
             ",".join(self.modules)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=self.env,
            cwd=self.directory)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], READY_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else ""
        try:
            report = json.loads(line)
        except ValueError:
            report = {}
        if not report.get("ready"):
            self.stop_process()
            failed = report.get("failed") or {}
            if failed:
                why = "; ".join(f"preload {name} failed: {error}"
                                for name, error in failed.items())
            elif report.get("threads", 1) > 1:
                why = (f"the preloaded modules started {report['threads'] - 1} threads (a "
                       f"fork keeps only one)")
            else:
                why = f"the zygote gave no report within {READY_TIMEOUT_S:g} s"
            logger.error("warm: %s; jobs run cold", why)
            return False
        logger.info("warm: zygote pid %d ready in %.2f s, preloaded %s", report["pid"],
                    report["seconds"], ", ".join(report["loaded"]) or "nothing")
        return True

    def stop_process(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()

    def stop(self) -> None:
        """At worker shutdown: the zygote goes (its running jobs' runners see it die)."""
        self.stopping.set()
        self.stop_process()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
            os.rmdir(self.directory)


class WarmRunner(JobProcess):
    """A job forked from the zygote at ``socket_path``; the same ``wait``/``kill`` as the cold
    ``Runner`` (the runner in between is the same code). Raises ``WarmUnavailable`` if the
    zygote cannot start it.

    Parameters:
        socket_path: the zygote's socket.
        argv: ``[python, script, args...]`` as the cold start would run it.
        cwd, env, log_path: as for ``Runner``.
    """

    def __init__(self, socket_path: str, argv: Sequence[str], cwd: Path,
                 env: Mapping[str, str], log_path: Path) -> None:
        request = json.dumps({"argv": list(argv), "cwd": str(cwd), "env": dict(env),
                              "log": str(log_path.resolve())}).encode() + b"\n"
        # Held open while the job runs: the runner stops the job once it closes (this
        # process died), as a cold runner does when its parent dies.
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connection.settimeout(REQUEST_TIMEOUT_S)
            self._connection.connect(socket_path)
            self._connection.sendall(request)
            message, fds, _, _ = socket.recv_fds(self._connection, 4096, 2)
        except OSError as err:
            self._connection.close()
            raise WarmUnavailable(f"the zygote did not answer: {err.strerror or err}") from None
        try:
            reply = json.loads(message)
        except ValueError:
            reply = {}
        if len(fds) != 2 or "pid" not in reply:
            for fd in fds:
                os.close(fd)
            self._connection.close()
            raise WarmUnavailable(f"the zygote refused the job: {reply.get('error', message)}")
        self.pid = int(reply["pid"])
        self._status_fd, self._pidfd = fds
        self._ready_fd = self._status_fd  # readable once the runner wrote the status (or died)

    def _collect(self) -> Outcome:
        data = os.read(self._status_fd, STATUS_READ_BYTES)
        os.close(self._status_fd)
        os.close(self._pidfd)
        self._connection.close()
        return outcome_of(data, "it died")
