"""Running a job's script so that nothing it starts outlives it (Linux).

Between the worker's pool process and the script sits a small runner, forked
from the pool process (no interpreter start): it is a child subreaper, so
every process the script starts, even one that detaches, stays its
descendant; and it gets SIGTERM when the pool process dies (``PDEATHSIG``,
e.g. the worker was SIGKILLed). Whenever it stops, because the script
exited, a timeout, a cancel or its parent's death, it kills every descendant
left before exiting. The script's wait status reaches the pool process over
a pipe, so an exit status is never confused with a signal.

    pool process ── runner (subreaper, own process group) ── script ── its children
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

try:  # imported here, not in each forked runner: an import there costs a job milliseconds
    import setproctitle
except ImportError:  # optional (the worker extra): ps then shows the forking process's title
    setproctitle = None

PR_SET_PDEATHSIG = 1  # prctl: signal this process when its parent dies
PR_SET_CHILD_SUBREAPER = 36  # prctl: orphaned descendants are re-parented to this process
PR_SET_NAME = 15  # prctl: this process's name (comm), as ps and /proc show it
# How long the runner keeps killing and reaping descendants before it gives up (seconds).
REAP_TIMEOUT_S = 10.0
# Exit status of a runner that could not start the script.
EXEC_FAILED = 127


# What the runner writes on its status pipe once its whole tree is reaped: the script's
# wait status, then the tree's user and system CPU seconds and the largest RSS of any of its
# processes (KiB), as getrusage(RUSAGE_CHILDREN) counts them. Killed, it writes the status
# alone.
STATUS_FORMAT = "=i"
USAGE_FORMAT = "=iddq"
# Enough for either (one write, one read: a pipe write this small is atomic).
STATUS_READ_BYTES = 64


@dataclass(frozen=True)
class Outcome:
    """How the script ended: its exit code, or the signal that killed it (or neither); and,
    when the runner could count them, the CPU seconds of its whole process tree and the
    largest resident set of any process of it (MiB)."""

    exit_code: int | None
    signal: int | None = None
    error: str | None = None
    cpu_s: float | None = None
    max_rss_mb: float | None = None


def prctl(option: int, value: int | ctypes.c_char_p) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc().prctl(option, value, 0, 0, 0)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library, opened once (forked processes inherit it, and do not open it again on
    a job's path)."""
    return ctypes.CDLL(None, use_errno=True)


def job_title(env: Mapping[str, str]) -> str:
    """What ``ps`` shows for a job's runner: which job, of which run, where, which attempt."""
    return (f"scripts-coordinator runner: job {env.get('SC_JOB_ID', '?')} of run "
            f"{env.get('SC_RUN_ID', '?')} on {env.get('SC_NODE', '?')}, attempt "
            f"{env.get('SC_ATTEMPT', '?')}")


def name_process(title: str, comm: str | None = None) -> None:
    """Name this process in ``ps``: ``title`` as its command line (where setproctitle is
    installed; a forked runner would otherwise show its pool process's title), and
    ``comm`` as its short name (``/proc/PID/comm``), when given. setproctitle finds the
    memory of argv by that of environ, so its first call in a process (or an ancestor) must
    come before the environment is cleared: a spare names itself before its job clears it."""
    if setproctitle is not None:
        setproctitle.setproctitle(title)  # on Linux it sets comm too: set ours after it
    if comm is not None:
        prctl(PR_SET_NAME, ctypes.c_char_p(comm.encode()))


def children(pid: int) -> list[int]:
    """The live child pids of ``pid``."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def kill_descendants() -> None:
    """SIGKILL and reap every descendant of this (subreaper) process, until none is left."""
    deadline = time.monotonic() + REAP_TIMEOUT_S
    me = os.getpid()
    while time.monotonic() < deadline:
        if not has_children():  # the common case, without reading /proc
            return
        pids = children(me)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reaped = False
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                reaped = True
        if not pids and not reaped:
            return
        time.sleep(0.01)


def has_children() -> bool:
    """Whether this process has a child, live or not yet reaped (a subreaper's orphaned
    descendants are its children)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def arm(status_fd: int, parent: int) -> None:
    """Make this forked process a job's runner: its own process group, the subreaper of all
    the script starts, stopped (every descendant killed, "killed" on ``status_fd``) by
    SIGTERM, SIGINT, SIGHUP or the death of ``parent``."""
    os.setpgid(0, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def stop(signum: int, frame: object) -> None:
        kill_descendants()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        os.write(status_fd, struct.pack(USAGE_FORMAT, signal.SIGKILL,  # "killed by SIGKILL"
                                        usage.ru_utime, usage.ru_stime, usage.ru_maxrss))
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    if os.getppid() != parent:  # the parent died before PDEATHSIG was armed
        os._exit(128 + signal.SIGTERM)


def supervise(script: int, status_fd: int, waiter: socket.socket | None = None) -> NoReturn:
    """The rest of an armed runner's life: wait for ``script`` (stopping it if ``waiter``
    closes), kill and reap whatever it left, write its status and usage, exit."""
    if waiter is None:
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == script:
                break
    else:
        status = wait_or_stop(script, waiter)
    kill_descendants()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every process of the tree, reaped
    os.write(status_fd, struct.pack(USAGE_FORMAT, status, usage.ru_utime, usage.ru_stime,
                                    usage.ru_maxrss))
    os._exit(0)


def runner_main(start_script: Callable[[int, int], int], log_path: str, status_fd: int,
                parent: int, title: str | None = None) -> NoReturn:
    """A cold job's runner, its whole life (in a child forked from the pool process); never
    returns. ``start_script(log_fd, status_fd)`` starts the script as a child of this
    process and returns its pid (``spawn_script``); ``title``: its name in ``ps``
    (``job_title``). A warm job's runner is the same but for how its script starts
    (``zygote.spare_main``)."""
    if title is not None:
        name_process(title)
    arm(status_fd, parent)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        script = start_script(log_fd, status_fd)
    except OSError as err:
        os.write(log_fd, f"could not start the script: {err}\n".encode())
        os.write(status_fd, struct.pack(STATUS_FORMAT, EXEC_FAILED << 8))  # "exited with 127"
        os._exit(0)
    os.close(log_fd)
    supervise(script, status_fd)


def wait_or_stop(script: int, waiter: socket.socket) -> int:
    """``script``'s wait status; if ``waiter`` closes first (its process died, or gave up the
    job), SIGTERM to this runner instead, whose handler stops the script and all it started.
    One ``select`` on both, not a thread: a thread's start costs a freshly forked runner
    half a millisecond of CPU, beside its script's start."""
    script_fd = os.pidfd_open(script)
    waiter.settimeout(None)
    while True:
        readable, _, _ = select.select([script_fd, waiter], [], [])
        if waiter in readable:
            try:
                closed = not waiter.recv(64)
            except OSError:
                closed = True
            if closed:
                os.kill(os.getpid(), signal.SIGTERM)
        if script_fd in readable:
            return os.waitpid(script, 0)[1]


def spawn_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]
                 ) -> Callable[[int, int], int]:
    """A cold start: ``argv`` in a fresh process (posix_spawn: vfork and exec, so no second
    copy of the worker's address space)."""
    def start(log_fd: int, status_fd: int) -> int:
        os.chdir(cwd)  # the script's working directory (posix_spawn has no chdir of its own)
        return os.posix_spawn(
            argv[0], list(argv), dict(env),
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, log_fd, 1), (os.POSIX_SPAWN_DUP2, log_fd, 2),
                          (os.POSIX_SPAWN_CLOSE, status_fd)],
            setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

    return start


def outcome_of(data: bytes, runner_status: str) -> Outcome:
    """The script's outcome from what the runner wrote: its wait status, and its tree's
    usage when the runner lived to count it (``USAGE_FORMAT``)."""
    usage: dict[str, float] = {}
    if len(data) == struct.calcsize(USAGE_FORMAT):
        status, user, system, max_rss_kib = struct.unpack(USAGE_FORMAT, data)
        usage = {"cpu_s": round(user + system, 3), "max_rss_mb": round(max_rss_kib / 1024, 1)}
    elif len(data) == struct.calcsize(STATUS_FORMAT):
        status = struct.unpack(STATUS_FORMAT, data)[0]
    else:
        return Outcome(exit_code=None, error=f"the job's runner ended without the script's "
                                             f"status ({runner_status})")
    if os.WIFSIGNALED(status):
        return Outcome(exit_code=None, signal=os.WTERMSIG(status), **usage)
    return Outcome(exit_code=os.WEXITSTATUS(status), **usage)


class JobProcess:
    """What the pool process holds of a running job: ``wait`` for its outcome, ``kill`` it
    with all it started. ``pid`` is the runner's (its process group's), ``_pidfd`` refers
    to it, ``_ready_fd`` turns readable once the outcome can be read (``_collect``)."""

    pid: int
    _pidfd: int
    _ready_fd: int

    def wait(self, timeout: float | None = None) -> Outcome | None:
        """The script's outcome once the runner is done; None if ``timeout`` passes first."""
        ready, _, _ = select.select([self._ready_fd], [], [], timeout)
        if not ready:
            return None
        return self._collect()

    def kill(self) -> Outcome:
        """Stop the script and all it started (SIGTERM to the runner, which cleans up)."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
        outcome = self.wait(REAP_TIMEOUT_S + 5)
        if outcome is None:  # the runner itself is stuck: kill its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            outcome = self.wait(REAP_TIMEOUT_S) or self._collect()
        return outcome

    def _collect(self) -> Outcome:
        raise NotImplementedError


class Runner(JobProcess):
    """Start a script under a runner; ``wait`` for it; ``kill`` it with everything it started.

    Parameters:
        argv: the script's command line (``argv[0]`` an absolute executable path).
        cwd: where it runs.
        env: its whole environment.
        log_path: stdout and stderr are appended here.
    """

    def __init__(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                 log_path: Path) -> None:
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                runner_main(spawn_script(argv, str(cwd), env), str(log_path), write_fd,
                            parent, title=job_title(env))
            finally:
                os._exit(EXEC_FAILED)
        os.close(write_fd)
        self.pid = pid
        self._status_fd = read_fd
        self._pidfd = os.pidfd_open(pid)
        self._ready_fd = self._pidfd  # readable once the runner has exited

    def _collect(self) -> Outcome:
        """Reap the runner and read the script's wait status from the pipe."""
        _, runner_status = os.waitpid(self.pid, 0)
        data = os.read(self._status_fd, STATUS_READ_BYTES)
        os.close(self._status_fd)
        os.close(self._pidfd)
        return outcome_of(data, f"wait status {runner_status}")
