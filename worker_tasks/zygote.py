"""The warm parent of a worker's jobs: one process that has imported the heavy modules once,
from which each job's interpreter is forked instead of started.

``python -m worker_tasks.zygote SOCKET MODULES`` imports ``MODULES`` (comma-separated),
prints one JSON line (``{"ready": true, ...}`` or ``{"ready": false, "failed": ...}``),
and serves requests on the Unix socket ``SOCKET``, one JSON line each: a reservation
(``{"reserve": true}``), answered with a spare runner (``Spare``; ``runner.arm``: own process
group, subreaper, killed with its parent) under which the script's process is already forked
and waiting; or one job (argv, cwd, env, log path), handed to a spare forked for it. A pool
process reserves the spare for its next job as each job starts and hands that job straight to
it: neither a fork of this large process (two forks of a 140 MiB zygote cost a job about
9 ms) nor a round trip through it lies on a job's path. The script's process sets up what
``python script.py`` would have (stdio on the job's log, default signal handlers, fresh
random seeds) and runs the script as that command would (``forked_script``). The reply
hands the worker the runner's pidfd and the pipe its wait status comes on (``SCM_RIGHTS``;
for a reservation, also the socket its job goes to), so the worker waits and kills exactly
as for a cold job.

The zygote is single-threaded and never runs job code, so every job starts from the same
state; it never initialises CUDA (importing CuPy does not; a device query would, and CUDA
state does not survive a fork). It dies with the worker process that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import select
import shlex
import signal
import socket
import struct
import sys
import threading
import time
import types
from dataclasses import dataclass
from typing import Any, NoReturn

from worker_tasks.daemon import WARM_JOB_NAME
from worker_tasks.forked_script import reseed_after_fork, run_as_main, run_script
from worker_tasks.runner import (
    EXEC_FAILED,
    PR_SET_NAME,
    PR_SET_PDEATHSIG,
    STATUS_FORMAT,
    arm,
    job_title,
    kill_descendants,
    name_process,
    prctl,
    supervise,
)

# The largest request accepted (argv, env and paths of one job), bytes.
MAX_REQUEST_BYTES = 1 << 20
# What a pool process sends for the spare of its next job (one line, as every request).
RESERVE_REQUEST = b'{"reserve": true}\n'
# How long a connected worker may take to send its request (seconds).
REQUEST_TIMEOUT_S = 5.0
# How often the zygote reaps finished runners and looks whether its parent is alive (s).
IDLE_POLL_S = 1.0
# What ps shows for a spare runner and its script's process until their job comes.
SPARE_RUNNER_TITLE = "scripts-coordinator spare runner: waiting for a warm job"
SPARE_SCRIPT_TITLE = "scripts-coordinator spare interpreter: waiting for a warm job"
# How long a spare waits for its job before it rehearses its start (seconds): a spare is
# forked as the job before it starts, and rehearsing then would take that start's CPU.
REHEARSE_AFTER_S = 0.05
# A request of a job's shape that runs nothing, for a spare's rehearsal (``rehearse``).
REHEARSAL_ARGV = [sys.executable, os.devnull, "--output-file", "out.json"]


class BadRequest(ValueError):
    """A request that is not one job's (argv, cwd, env, log)."""


def check_request(request: Any) -> tuple[list[str], str, dict[str, str], str]:
    """(argv, cwd, env, log) of a request; ``BadRequest`` naming what is wrong."""
    if not isinstance(request, dict):
        raise BadRequest("a request must be a JSON object")
    argv, cwd, env, log = (request.get(name) for name in ("argv", "cwd", "env", "log"))
    if not (isinstance(argv, list) and len(argv) >= 2 and all(isinstance(a, str) for a in argv)):
        raise BadRequest("argv must be [python, script, args...] (strings)")
    if not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                          for k, v in env.items())):
        raise BadRequest("env must map strings to strings")
    if not (isinstance(cwd, str) and os.path.isabs(cwd) and isinstance(log, str)
            and os.path.isabs(log)):
        raise BadRequest("cwd and log must be absolute paths")
    return argv, cwd, env, log


def freeze_heap() -> None:
    """(In the zygote, before a fork.) Its objects out of the garbage collector's sight: a job
    forked from it collects its own objects only, without a first write to the pages of the
    zygote's (copy on write), and its exit can afford a collection (``let_go``). Its garbage
    is collected first, so that none is frozen; cheap after the first time, when only what
    was made since the last freeze is looked at."""
    gc.collect()
    gc.freeze()


def receive(connection: socket.socket) -> tuple[bytes, list[int]]:
    """One request: a line (``MAX_REQUEST_BYTES`` at most), and the descriptors that came
    with its first bytes; ``b""`` when the other end closed first. The connection stays
    open (a pool process that handed the job itself keeps it, as its waiter)."""
    data, fds, _, _ = socket.recv_fds(connection, 65536, 1)
    while data and not data.endswith(b"\n") and len(data) <= MAX_REQUEST_BYTES:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    return data, fds


def send_with_fd(connection: socket.socket, data: bytes, fd: int) -> None:
    """All of ``data``, the descriptor ``fd`` riding on its first bytes."""
    sent = socket.send_fds(connection, [data], [fd])
    if sent < len(data):
        connection.sendall(data[sent:])


def rehearse_while_waiting(connection: socket.socket, script: bool) -> None:
    """Rehearse (``rehearse``) unless the job comes within ``REHEARSE_AFTER_S``."""
    ready, _, _ = select.select([connection], [], [], REHEARSE_AFTER_S)
    if not ready:
        with contextlib.suppress(Exception):  # only ever a head start
            rehearse(script)


def rehearse(script: bool) -> None:
    """(In a spare, before its job comes.) Walk a job's start once with a request that runs
    nothing: a forked process pays for the first write to each page it shares with the
    zygote (copy on write), some 600 page faults and 3 ms on a 2-core VM for a script's
    start, and a rehearsal pays them while the spare waits instead of on the job's path.
    ``script``: in the script's process (the environment and ``run_as_main`` too), else in the
    runner (the request only)."""
    environ = dict(os.environ)  # the job's is much the same
    request = json.dumps({"argv": REHEARSAL_ARGV, "cwd": os.sep, "env": environ,
                          "log": os.devnull})
    argv, _, env, _ = check_request(json.loads(request))
    shlex.join(argv)
    if not script:
        return
    os.environ.clear()  # then put back as it was: the job's own replaces it
    os.environ.update(env)
    os.path.dirname(os.path.realpath(argv[1]))
    run_as_main(argv[1], types.ModuleType("__rehearsal__"), install=False)


def await_job(from_runner: socket.socket) -> NoReturn:
    """A spare script process: what does not depend on the job done ahead of it (default
    signal handlers, stdin, unbuffered stdio, fresh random seeds); then wait for the job
    (argv, cwd, env; the log's descriptor) from its runner, point stdout and stderr at the
    log, run it. A runner that goes first ends it too."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # not the runner's handler
        signal.signal(signum, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for stream in (sys.stdout, sys.stderr):  # as PYTHONUNBUFFERED=1 would
        stream.reconfigure(line_buffering=True, write_through=True)
    reseed_after_fork()
    rehearse_while_waiting(from_runner, script=True)
    data, fds = receive(from_runner)
    from_runner.close()
    if not data or len(fds) != 1:
        os._exit(0)
    argv, cwd, env, _ = check_request(json.loads(data))
    os.dup2(fds[0], 1)
    os.dup2(fds[0], 2)
    os.close(fds[0])
    run_script(argv, cwd, env)


def fork_waiting_script(status_fd: int, control: socket.socket | None = None
                        ) -> tuple[int, socket.socket]:
    """(In a runner.) Fork the script's process, to wait for its job (``await_job``); its
    pid and where to send the job. It keeps none of the runner's descriptors."""
    to_script, from_runner = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            name_process(SPARE_SCRIPT_TITLE)
            if control is not None:
                control.close()
            to_script.close()
            os.close(status_fd)
            await_job(from_runner)
        finally:
            os._exit(1)
    from_runner.close()
    return pid, to_script


def spare_main(control: socket.socket, status_fd: int, parent: int) -> NoReturn:
    """A spare runner's life (forked from the zygote before its job is known): armed as every
    runner is, its script's process forked and waiting under it; then the job, handed down to
    the script: from the pool process that reserved it, on ``control``, which that process
    keeps open while it waits (its waiter); or from the zygote, with the pool process's
    connection to the zygote as the waiter. Whoever closes ``control`` first ends both."""
    sys.stdout.flush()
    sys.stderr.flush()
    name_process(SPARE_RUNNER_TITLE)
    arm(status_fd, parent)
    script, to_script = fork_waiting_script(status_fd, control)
    rehearse_while_waiting(control, script=False)
    data, fds = receive(control)
    if not data or len(fds) > 1:
        kill_descendants()
        os._exit(0)
    if fds:  # from the zygote: the pool process's connection to it
        waiter = socket.socket(fileno=fds[0])
        control.close()
    else:  # from the pool process that reserved this spare
        waiter = control
    _, _, env, log = check_request(json.loads(data))
    # A job's runner from now on (the worker's stop waits for it; a spare it does not).
    prctl(PR_SET_NAME, ctypes.c_char_p(WARM_JOB_NAME.encode()))
    try:
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # nowhere to say why: the job fails as a script that could not start
        os.write(status_fd, struct.pack(STATUS_FORMAT, EXEC_FAILED << 8))  # "exited with 127"
        kill_descendants()
        os._exit(0)
    try:
        send_with_fd(to_script, data, log_fd)
    except OSError:  # its waiting process was killed meanwhile: another, forked now
        with contextlib.suppress(ChildProcessError):
            os.waitpid(script, 0)
        script, to_script = fork_waiting_script(status_fd)
        send_with_fd(to_script, data, log_fd)
    to_script.close()
    os.close(log_fd)
    name_process(job_title(env), WARM_JOB_NAME)  # after the hand-over: off the job's path
    supervise(script, status_fd, waiter)


@dataclass
class Spare:
    """A runner forked ahead of its job, its script's process under it, both waiting: a job
    handed to it starts without a fork of the zygote (a large process) on its path.

    Parameters:
        pid: the runner's pid (its process group).
        pidfd: refers to the runner, for the pool process to signal and wait on.
        status_fd: the read end of the runner's status pipe (``runner.STATUS_FORMAT``).
        control: where its job is handed to it (by the zygote, or by the pool process that
            reserved it).
    """

    pid: int
    pidfd: int
    status_fd: int
    control: socket.socket

    @classmethod
    def fork(cls, *zygotes: socket.socket) -> Spare:
        """Fork one; ``zygotes``: the zygote's own sockets (its listener, the connection it
        answers), which the spare must not keep."""
        control, theirs = socket.socketpair()
        read_fd, write_fd = os.pipe()
        me = os.getpid()
        freeze_heap()
        pid = os.fork()
        if pid == 0:
            try:
                for own in zygotes:
                    own.close()
                control.close()
                os.close(read_fd)
                spare_main(theirs, write_fd, me)
            finally:
                os._exit(127)
        theirs.close()
        os.close(write_fd)
        return cls(pid, os.pidfd_open(pid), read_fd, control)

    def hand(self, request: bytes, waiter: socket.socket) -> None:
        """Give it its job; ``OSError`` if it is gone."""
        send_with_fd(self.control, request, waiter.fileno())
        self.control.close()

    def close(self) -> None:
        """Let go of it (a spare not handed a job, nor reserved, ends, its script's process
        with it)."""
        self.control.close()
        os.close(self.status_fd)
        os.close(self.pidfd)

    def fds(self) -> list[int]:
        """What a reservation's reply carries: its control socket, status pipe and pidfd."""
        return [self.control.fileno(), self.status_fd, self.pidfd]


class Zygote:
    """The serving loop: accept a request; for a reservation, fork a spare runner and hand it
    over; for a job (a pool process without a reservation), fork a spare, hand it the job
    and reply with the runner's pidfd and status pipe.

    Parameters:
        listener: the bound, listening Unix socket.
        parent: the worker process that started this zygote (it dies with it).
    """

    def __init__(self, listener: socket.socket, parent: int) -> None:
        self.listener = listener
        self.parent = parent

    def serve(self) -> NoReturn:
        while True:
            ready, _, _ = select.select([self.listener], [], [], IDLE_POLL_S)
            self.reap()
            if os.getppid() != self.parent:
                os._exit(0)
            if ready:
                connection, _ = self.listener.accept()
                with connection:
                    self.handle(connection)

    def reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass

    def handle(self, connection: socket.socket) -> None:
        connection.settimeout(REQUEST_TIMEOUT_S)
        try:
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_REQUEST_BYTES:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                data += chunk
            if data == RESERVE_REQUEST:
                self.reserve(connection)
                return
            check_request(json.loads(data))
        except (OSError, ValueError) as err:  # BadRequest and bad JSON are ValueErrors
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps({"error": str(err)[:500]}).encode() + b"\n")
            return
        try:
            spare = self.fork_for(data, connection)
        except OSError as err:  # no runner could take it: the job runs cold, saying why
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps({"error": f"no runner: {err}"}).encode() + b"\n")
            return
        try:
            socket.send_fds(connection, [json.dumps({"pid": spare.pid}).encode() + b"\n"],
                            [spare.status_fd, spare.pidfd])
        except OSError:  # the worker went away: nobody waits for this job
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(spare.pidfd, signal.SIGTERM)
        finally:
            spare.close()

    def reserve(self, connection: socket.socket) -> None:
        """A spare for the next job of the pool process on ``connection``, handed over: it
        goes with that process (or with this zygote)."""
        spare = Spare.fork(self.listener, connection)
        try:
            socket.send_fds(connection, [json.dumps({"pid": spare.pid}).encode() + b"\n"],
                            spare.fds())
        except OSError:  # the pool process went away: nobody will hand it a job
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(spare.pidfd, signal.SIGTERM)
        finally:
            spare.close()

    def fork_for(self, request: bytes, connection: socket.socket) -> Spare:
        """A spare forked for this job (its pool process had none reserved), handed it."""
        spare = Spare.fork(self.listener, connection)
        try:
            spare.hand(request, connection)
        except OSError:
            spare.close()
            raise
        return spare


def preload(modules: list[str]) -> tuple[list[str], dict[str, str]]:
    """Import each module; (the ones imported, module -> one-line error for the others)."""
    loaded, failed = [], {}
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as err:  # noqa: BLE001 (any failure is reported, not raised)
            failed[name] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        else:
            loaded.append(name)
    return loaded, failed


def listen(socket_path: str) -> socket.socket:
    """The zygote's socket, bound at ``socket_path`` (this user only) and listening. The
    worker makes it before its pool starts, so no job can come before it listens; jobs that
    come while the zygote imports wait for it in the backlog, not cold."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)  # in a 0700 directory; then this user only (not umask: a
    os.chmod(socket_path, 0o600)  # worker's other threads would see it change)
    listener.listen(16)
    return listener


def main(argv: list[str]) -> NoReturn:
    """``SOCKET MODULES [FD]``: FD, the listening socket its worker made (``listen``);
    without it, the zygote makes it."""
    socket_path, modules = argv[0], [name for name in argv[1].split(",") if name]
    parent = os.getppid()
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(0)
    listener = (socket.socket(fileno=int(argv[2])) if len(argv) > 2
                else listen(socket_path))
    started = time.monotonic()
    loaded, failed = preload(modules)
    freeze_heap()  # the first freeze looks at every object: here, not on a job's path
    threads = threading.active_count()
    ready = not failed and threads == 1  # a fork keeps only the forking thread
    report = {"ready": ready, "pid": os.getpid(), "loaded": loaded, "failed": failed,
              "threads": threads, "seconds": round(time.monotonic() - started, 3)}
    print(json.dumps(report), flush=True)
    if not ready:  # waiting jobs see the socket close, and run cold
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(socket_path)
        os._exit(1)
    Zygote(listener, parent).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
