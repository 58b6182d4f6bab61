"""Warm jobs: the worker keeps a zygote (``zygote.py``) and forks each job's interpreter
from it, its heavy imports already done.

Opt-in per worker (``coordinator worker --warm``, which sets ``SC_WARM``) and per job (the
``warm`` field; default: the worker's setting). The worker's main process starts the
zygote at worker start and keeps it (``Supervisor``, a thread): a preload that fails is
one log line and jobs then run cold; a zygote that dies is restarted, saying so. The pool
process hands each job to the spare runner it reserved from the zygote once its previous
job had started (``Reservations``), or, without one, asks the zygote (``WarmRunner``, the cold
``Runner``'s interface: ``wait``, ``kill``); when the zygote cannot answer, the job runs cold
and its log says why.

Beside it runs a bare zygote, which imports nothing: a script that cannot use the preload
(``uses_preload``: it imports only standard-library modules, none of them preloaded) is
forked from there, and so is one whose source names a variable that preloaded modules read
at import (``OMP_NUM_THREADS``), so that its own import reads what it set. Every fork,
exit and first write of a large process costs in proportion to its memory (the default
preload is 140 MiB; forking it costs a job about 7 ms more than forking the bare one), and
a script of the first kind would pay it for nothing.

Parameters (environment, set by ``coordinator worker``):
    SC_WARM       1: jobs run warm unless they say ``"warm": false``
    SC_PRELOAD    modules the zygote imports (comma-separated; default ``DEFAULT_PRELOAD``)
    SC_WARM_SOCKET  (set by the worker) where its zygote listens
    SC_WARM_BARE_SOCKET  (set by the worker) where its bare zygote listens
"""

from __future__ import annotations

import ast
import contextlib
import functools
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
from dataclasses import dataclass
from pathlib import Path

from worker_tasks.runner import STATUS_READ_BYTES, JobProcess, Outcome, outcome_of
from worker_tasks.zygote import RESERVE_REQUEST, listen

logger = logging.getLogger(__name__)

WARM_VARIABLE = "SC_WARM"
PRELOAD_VARIABLE = "SC_PRELOAD"
SOCKET_VARIABLE = "SC_WARM_SOCKET"
BARE_SOCKET_VARIABLE = "SC_WARM_BARE_SOCKET"
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
# How long after a job is handed over its pool process asks for the next job's spare
# (seconds): the spare's fork and set-up, run at once, took the CPU from this job's start
# (its hand-over 3.3 ms on a loaded 2-core VM, 2.2 ms with the spare asked for 0.1 s later);
# not much later, so that a short job's next spare is still forked while it runs.
RESERVE_AFTER_S = 0.02
# A job whose env sets one of these runs cold, and a script that names one in its source
# is forked from the bare zygote: preloaded modules read them at import.
IMPORT_TIME_ENV = re.compile(r"(OMP|MKL|OPENBLAS|NUMEXPR|NUMBA)_[A-Z0-9_]+")


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


def start_zygotes(env: Mapping[str, str]) -> list[Supervisor]:
    """(In the worker's main process, before its pool starts.) The zygote with the preload,
    and the bare one beside it when there is a preload; each one's socket goes into this
    process's environment, for the pool processes to find."""
    modules = preload_modules()
    supervisors = [(SOCKET_VARIABLE, Supervisor(modules, env))]
    if modules:
        supervisors.append((BARE_SOCKET_VARIABLE, Supervisor([], env, name="bare zygote")))
    for variable, supervisor in supervisors:
        os.environ[variable] = supervisor.socket_path
        supervisor.start()
    return [supervisor for _, supervisor in supervisors]


def socket_for(script: Path) -> str | None:
    """Where the zygote that should fork ``script`` listens (None: this worker keeps none):
    the bare one when the script cannot use the preload."""
    bare = os.environ.get(BARE_SOCKET_VARIABLE)
    if bare and not uses_preload(script, preload_modules()):
        return bare
    return os.environ.get(SOCKET_VARIABLE)


def uses_preload(script: Path, preload: Sequence[str]) -> bool:
    """Whether ``script`` may use a preloaded module: True unless its source shows it imports
    only standard-library modules, none of them preloaded (a third-party import may pull in
    a preloaded one: SciPy imports NumPy), or names a variable that preloaded modules read at
    import (``os.environ["OMP_NUM_THREADS"] = "1"`` before ``import numpy``: from the bare
    zygote, the script's own import reads it, as in a cold start). An import the source does
    not name (relative, ``__import__``, ``importlib``) or a script that cannot be read counts
    as using it."""
    try:
        stat = script.stat()
    except OSError:
        return True
    source = read_source(str(script), stat.st_mtime_ns, stat.st_size)
    if source is None:
        return True
    if source.names_import_time_env:
        return False
    if source.imports is None:
        return True
    preloaded = {name.split(".")[0] for name in preload}
    return not (source.imports <= STANDARD_LIBRARY) or bool(source.imports & preloaded)


# Top-level names of the standard library's modules (sys.stdlib_module_names has them all).
STANDARD_LIBRARY = frozenset(sys.stdlib_module_names)
# Calls that import a module named at run time: their module cannot be read from the source.
DYNAMIC_IMPORTS = frozenset({"__import__", "import_module"})


@dataclass(frozen=True)
class Source:
    """What a script's source says about its imports.

    Parameters:
        imports: the top-level modules it names in its imports; None when they cannot all
            be read from the source (relative, named at run time).
        names_import_time_env: a string of it names a variable that preloaded modules read
            at import (``IMPORT_TIME_ENV``), which the script may set before it imports them.
    """

    imports: frozenset[str] | None
    names_import_time_env: bool


@functools.lru_cache(maxsize=256)
def read_source(path: str, mtime_ns: int, size: int) -> Source | None:
    """What the script at ``path`` says (one version of the file: its mtime and size are the
    cache's key); None when it cannot be parsed."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] | None = set()
    names_env = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names_env = names_env or IMPORT_TIME_ENV.fullmatch(node.value) is not None
        elif names is None:
            continue
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level or not node.module:
                names = None
            else:
                names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and (
                getattr(node.func, "id", None) in DYNAMIC_IMPORTS
                or getattr(node.func, "attr", None) in DYNAMIC_IMPORTS):
            names = None
    return Source(None if names is None else frozenset(names), names_env)


class Supervisor:
    """The worker's zygote: started, watched and restarted from one thread of the main
    process (the zygote dies with that process, even SIGKILLed: its death signal).

    Parameters:
        modules: what the zygote imports before serving.
        env: its environment (the worker's, without the broker's secrets).
        name: what the worker log calls it.
    """

    def __init__(self, modules: Sequence[str], env: Mapping[str, str],
                 name: str = "zygote") -> None:
        self.modules = list(modules)
        self.env = dict(env)
        self.name = name
        self.directory = tempfile.mkdtemp(prefix="sc-warm-")  # mode 0700
        self.socket_path = os.path.join(self.directory, "zygote.sock")
        self.process: subprocess.Popen[str] | None = None
        self.listener: socket.socket | None = None  # made by ``start``, taken by ``launch``
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.keep, name="sc-zygote", daemon=True)

    def start(self) -> None:
        """Listen at ``socket_path`` now (the zygote takes the socket over), then start it."""
        self.listener = listen(self.socket_path)
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
                logger.error("warm: the %s died %d times within %.0f s; jobs run cold",
                             self.name, len(deaths), RESTART_WINDOW_S)
                return
            logger.warning("warm: the %s (pid %d) died (status %s); restarting it",
                           self.name, self.process.pid, status)

    def launch(self) -> bool:
        """Start one zygote and wait for its report; False if it cannot serve."""
        # The socket made at start for the first zygote, a fresh one for each restart.
        listener, self.listener = self.listener or listen(self.socket_path), None
        with listener:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker_tasks.zygote", self.socket_path,
                 ",".join(self.modules), str(listener.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, env=self.env,
                cwd=self.directory, pass_fds=(listener.fileno(),))
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
                why = f"the {self.name} gave no report within {READY_TIMEOUT_S:g} s"
            logger.error("warm: %s; jobs run cold", why)
            return False
        logger.info("warm: %s pid %d ready in %.2f s, preloaded %s", self.name, report["pid"],
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


@dataclass
class Reserved:
    """A spare runner a pool process holds for its next job (``zygote.Spare``, as its reply
    carried it): the job goes to ``control``, which then stays open as the runner's waiter."""

    pid: int
    control: socket.socket
    status_fd: int
    pidfd: int

    def hand(self, request: bytes) -> None:
        """Give it the job; ``OSError`` if it is gone (killed, or its zygote died)."""
        self.control.sendall(request)

    def close(self) -> None:
        self.control.close()
        os.close(self.status_fd)
        os.close(self.pidfd)


class Reservations:
    """(In a pool process.) The spare of its next job, asked of each zygote as a job starts
    and read when the next job comes, so that neither a fork nor a round trip through the
    zygote lies on a job's path. A spare held while its zygote dies dies with it: its job
    then goes through the zygote as without a reservation."""

    def __init__(self) -> None:
        self.pending: dict[str, socket.socket] = {}  # zygote socket -> where its reply comes

    def ask(self, socket_path: str) -> None:
        """Ask that zygote for a spare (its reply is read by ``take``)."""
        self.drop(socket_path)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.settimeout(REQUEST_TIMEOUT_S)
            connection.connect(socket_path)
            connection.sendall(RESERVE_REQUEST)
        except OSError:
            connection.close()
            return
        self.pending[socket_path] = connection

    def take(self, socket_path: str) -> Reserved | None:
        """The spare that zygote reserved for this job; None without one."""
        connection = self.pending.pop(socket_path, None)
        if connection is None:
            return None
        with connection:
            try:
                message, fds, _, _ = socket.recv_fds(connection, 4096, 3)
            except OSError:
                return None
        try:
            pid = int(json.loads(message)["pid"])
        except (ValueError, KeyError, TypeError):
            pid = None
        if pid is None or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return None
        return Reserved(pid, socket.socket(fileno=fds[0]), fds[1], fds[2])

    def drop(self, socket_path: str) -> None:
        pending = self.pending.pop(socket_path, None)
        if pending is not None:
            pending.close()


# This pool process's reservations (a worker's pool process runs one job at a time).
reservations = Reservations()


def reserve_ahead() -> None:
    """(As a pool process starts.) A spare from each of the worker's zygotes that listens
    already, for its first job (a zygote still importing answers once it is done). Never
    waits: Celery kills a pool process that is not up within 4 s. A zygote not listening
    yet gets asked as the first job starts."""
    for variable in (SOCKET_VARIABLE, BARE_SOCKET_VARIABLE):
        socket_path = os.environ.get(variable)
        if socket_path and os.path.exists(socket_path):
            reservations.ask(socket_path)


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
        spare = reservations.take(socket_path)
        if spare is not None:
            try:
                spare.hand(request)
            except OSError:
                spare.close()
                spare = None
        if spare is not None:
            # Its control socket, held open while the job runs, is the runner's waiter.
            self.pid, self._connection = spare.pid, spare.control
            self._status_fd, self._pidfd = spare.status_fd, spare.pidfd
        else:
            self._ask_zygote(socket_path, request)
        self._ready_fd = self._status_fd  # readable once the runner wrote the status (or died)
        # The next job's spare, forked while this one runs, once this one has started.
        self._socket_path = socket_path
        self._reserve_at: float | None = time.monotonic() + RESERVE_AFTER_S

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """As ``JobProcess.wait``; the next job's spare is asked for ``RESERVE_AFTER_S`` after
        the hand-over, or as this job ends if it ends sooner."""
        if self._reserve_at is not None:
            head_start = max(self._reserve_at - time.monotonic(), 0.0)
            if timeout is None or timeout > head_start:
                outcome = super().wait(head_start)
                self.reserve_next()
                if outcome is not None:
                    return outcome
                timeout = None if timeout is None else timeout - head_start
        return super().wait(timeout)

    def reserve_next(self) -> None:
        """Ask the zygote for the next job's spare, once."""
        if self._reserve_at is not None:
            self._reserve_at = None
            reservations.ask(self._socket_path)

    def _ask_zygote(self, socket_path: str, request: bytes) -> None:
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

    def _collect(self) -> Outcome:
        data = os.read(self._status_fd, STATUS_READ_BYTES)
        os.close(self._status_fd)
        os.close(self._pidfd)
        self._connection.close()
        self.reserve_next()
        return outcome_of(data, "it died")
