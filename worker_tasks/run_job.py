"""The task that runs one script job on a node and writes its ``.done`` marker.

Success is a file: the script exits 0, its output file exists (and parses, for
``.json``), and only then ``<output-file>.done`` is written, atomically. A job
whose marker already exists is skipped, so a redelivered message or a resumed
run never runs a finished job twice. On top of that:

* the message is untrusted: every field is checked (``JobSpec.from_message``)
  and every path it names must stay inside the workdir, else it is refused;
* a message that is no longer the job's current one (the job was moved or
  retried since, or its run expired) is dropped without running anything;
* the node's lease (``lease.py``) is held while the job runs: one job at a time
  per node, whatever the pool size;
* a failed attempt is retried after a backoff, up to the job's ``retries``;
* the final state is written to Redis before the message is acknowledged,
  retrying while Redis is away, so tracking converges to what the files say.

Worker settings (environment variables, set by ``coordinator worker``):
    SC_SCRIPTS_DIR   where job scripts are looked up (default: current directory)
    SC_WORKDIR       where scripts run and relative paths resolve (default: current directory)
    SC_TRACKING_URL  the Redis holding run records (default: the broker URL)
    SC_TRACKING_RETRY  seconds a worker keeps retrying a tracking write (default 600)
    SC_GPU_DEVICE    the CUDA device index of its jobs, for a worker that sees one GPU
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar

import redis
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger

from worker_tasks.app import app
from worker_tasks.lease import NodeLease
from worker_tasks.runner import Outcome, Runner
from worker_tasks.spec import RUN_JOB_TASK, InvalidMessage, JobSpec
from worker_tasks.tracking import JobState, JobTracker, Transition, now

logger = get_task_logger(__name__)

LOG_TAG = "[scripts-coordinator]"
# How long tracking writes are retried while Redis is away (seconds), then given up.
TRACKING_RETRY_S = float(os.environ.get("SC_TRACKING_RETRY", "600"))
# How often a running job looks whether it was cancelled or superseded (seconds).
CANCEL_POLL_S = 1.0
# A failed job's error carries this much of the end of its output.
TAIL_LINES = 20
TAIL_BYTES = 4096
# The longest wait between two attempts, whatever the backoff says (seconds).
MAX_BACKOFF_S = 600.0
# Worker settings a script must not inherit (they may hold the broker's password).
PRIVATE_ENV = ("SC_BROKER_URL", "SC_RESULT_BACKEND", "SC_TRACKING_URL")
# Worker setting (not a message field): the CUDA device index its jobs get, when the worker
# sees one GPU only (a per-GPU worker in a container with that device).
GPU_DEVICE_VARIABLE = "SC_GPU_DEVICE"
# States a job may start (and finish) from, holding its current message: queued, running
# (a dead attempt's record, or this one's), or lost; the head node may have set either
# while this attempt ran, taking its worker for dead.
STARTABLE = (JobState.QUEUED, JobState.RUNNING, JobState.FINISHING, JobState.LOST)

T = TypeVar("T")


class JobFailed(Exception):
    """Raised after a failed job is recorded, so Celery and Flower show FAILURE."""


class JobRefused(Exception):
    """The job asks for what the worker does not allow (a script or path outside its
    directory, a missing script)."""


class ScriptNotFound(JobRefused):
    """No such script in that directory (the next directory may have it)."""


# This project's own job scripts, searched after --scripts-dir.
BUILTIN_SCRIPTS = Path(__file__).resolve().parent / "builtin_scripts"


def scripts_dir() -> Path:
    return Path(os.environ.get("SC_SCRIPTS_DIR") or os.getcwd()).resolve()


def workdir() -> Path:
    return Path(os.environ.get("SC_WORKDIR") or os.getcwd()).resolve()


@cache
def tracker() -> JobTracker:
    url = os.environ.get("SC_TRACKING_URL") or app.conf.broker_url
    return JobTracker(redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10))


def retrying(what: str, call: Callable[[], T], limit: float = TRACKING_RETRY_S) -> T:
    """``call()``, retried with backoff while Redis is unreachable, for up to ``limit`` s."""
    deadline = time.monotonic() + limit
    delay = 0.2
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if time.monotonic() >= deadline:
                raise
            logger.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def resolve_script(base: Path, script: str) -> Path:
    """The script's real path, refused unless it lies inside ``base``."""
    path = confine(base, script, "script")
    if not path.is_file():
        raise ScriptNotFound(f"script {script!r} not found in scripts directory {base}")
    return path


def find_script(script: str) -> Path:
    """The script in ``--scripts-dir``, else among this project's own job scripts.

    The built-in directory holds only the project's job scripts (the Step 3 scorer,
    the example), so an installed worker finds them without opening site-packages.
    """
    try:
        return resolve_script(scripts_dir(), script)
    except ScriptNotFound as err:
        try:
            return resolve_script(BUILTIN_SCRIPTS, script)
        except ScriptNotFound:
            raise JobRefused(f"{err} (nor among the built-in scripts)") from None


def confine(base: Path, relative: str, what: str) -> Path:
    """``base / relative``, refused unless it stays inside ``base`` once symlinks resolve."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise JobRefused(f"{what} {relative!r} is not a path inside {base}; refused")
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise JobRefused(f"{what} {relative!r} resolves outside {base} (symlink); refused")
    return path


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def script_env(spec: JobSpec, attempt: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in PRIVATE_ENV}
    env.update(spec.env)
    # A worker that sees only its own GPU (a container given one device) says which index
    # that GPU has for it; otherwise the job's gpu_id is the device.
    device = os.environ.get(GPU_DEVICE_VARIABLE) or str(spec.gpu_id)
    env.update(CUDA_VISIBLE_DEVICES=device, SC_RUN_ID=spec.run_id,
               SC_JOB_ID=spec.job_id, SC_NODE=spec.node, SC_ATTEMPT=str(attempt),
               PYTHONUNBUFFERED="1")
    return env


def check_output(output: Path | None) -> str | None:
    """The output half of the success rule; returns an error text or None."""
    if output is None:
        return None
    if not output.is_file():
        return f"exit status 0 but output file {output} was not written"
    if output.suffix == ".json":
        try:
            with output.open("rb") as fh:
                json.load(fh)
        except (ValueError, OSError) as err:
            return f"output file {output} is not valid JSON: {err}"
    return None


def log_line(log: Path, text: str) -> None:
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"{LOG_TAG} {text}\n")


def output_tail(log: Path, since: int) -> str:
    """The last lines the script wrote to its log in this attempt (after byte ``since``)."""
    try:
        with log.open("rb") as fh:
            fh.seek(max(since, log.stat().st_size - TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.splitlines() if not line.startswith(LOG_TAG)]
    return "\n".join(lines[-TAIL_LINES:]).strip()


def backoff(spec: JobSpec, attempt: int) -> float:
    """Exponential backoff with full jitter: base * 2^(attempt-1) * U(0.5, 1.5), capped."""
    return min(MAX_BACKOFF_S, spec.retry_delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))


class JobExecution:
    """One delivery of one job's message on this worker: from checks to final state.

    Parameters:
        spec: the checked message.
        task_id: the message's id (must be the job's current one in its record).
        host: the worker's name (``rig-a@machine``).
        send_event: Celery's event sender of the task (for REVOKED in Flower).
    """

    def __init__(self, spec: JobSpec, task_id: str, host: str,
                 send_event: Callable[..., Any]) -> None:
        self.spec = spec
        self.task_id = task_id
        self.host = host
        self.send_event = send_event
        self.base = workdir()
        self.result: dict[str, Any] = {"job_id": spec.job_id, "node": spec.node, "host": host,
                                       "exit_code": None, "duration_s": 0.0, "state": None,
                                       "error": None, "attempts": 0}

    # -- tracking ---------------------------------------------------------------------------

    def move(self, state: JobState, allowed: tuple[JobState, ...], what: str,
             **fields: Any) -> Transition:
        """A transition of this job's record, holding this message's task id, retried."""
        spec = self.spec
        event = {"attempts": self.result["attempts"], "host": self.host,
                 "duration_s": fields.get("duration_s"),
                 "error": (fields.get("error") or "").split("\n", 1)[0][:200] or None}
        return retrying(what, lambda: tracker().transition(
            spec.run_id, spec.job_id, state, allowed, holding=self.task_id, event=event,
            count_attempt=state is JobState.RUNNING and what == "start",
            unless_cancelled=what == "start", **fields))

    def current(self) -> dict[str, Any]:
        return retrying("read record", lambda: tracker().record(
            self.spec.run_id, self.spec.job_id, "state", "task_id", "history"))

    def still_wanted(self) -> bool:
        """False once the job was cancelled or its message superseded (checked while running)."""
        try:
            record = tracker().record(self.spec.run_id, self.spec.job_id, "state", "task_id")
        except redis.RedisError:
            return True  # Redis away: keep running; the final write waits for it
        if not record:
            return True  # the record vanished (Redis lost its data): nothing says stop
        return record.get("state") != JobState.CANCELLED and record.get("task_id") == self.task_id

    def dropped(self, why: str) -> dict[str, Any]:
        """A message that must not run (stale, or no such job): REVOKED in Flower, no result."""
        self.revoked(f"{why}; dropped without running")
        return self.result  # not reached: revoked() raises

    def revoked(self, why: str | None = None) -> NoReturn:
        """A cancelled (or dropped) job: Flower shows REVOKED, and no result is stored."""
        if why:
            logger.warning("job %s of run %s (message %s): %s", self.spec.job_id,
                           self.spec.run_id, self.task_id, why)
        self.send_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()

    # -- the job ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        spec = self.spec
        try:
            done = confine(self.base, spec.done_file, "done_file")
            log = confine(self.base, spec.log_file, "log_file")
            output = (confine(self.base, spec.output_file, "output_file")
                      if spec.output_file else None)
        except JobRefused as err:
            return self.refuse(str(err))
        record = self.current()
        if not record:
            return self.dropped("no tracking record (the run expired, or a forged message)")
        if record.get("task_id") != self.task_id:
            return self.dropped(f"superseded by message {record.get('task_id')}")
        if record.get("state") == JobState.CANCELLED:
            self.revoked("cancelled; not run")
        if done.exists():
            return self.skip()
        lease = NodeLease(tracker().client, spec.slot, self.host, self.task_id)
        if not retrying("lease", lambda: lease.acquire(give_up=lambda: not self.still_wanted())):
            return self.not_wanted()
        try:
            return self.attempts(done, log, output, record.get("history") or [])
        finally:
            lease.release()

    def refuse(self, why: str) -> dict[str, Any]:
        logger.error("job %s of run %s refused: %s", self.spec.job_id, self.spec.run_id, why)
        moved = self.move(JobState.FAILED, STARTABLE, "refuse", error=why, finished_at=now())
        if not moved.ok:
            return self.dropped(f"refused ({why}), and its record is {moved.outcome}")
        raise JobFailed(why)

    def skip(self) -> dict[str, Any]:
        # A message delivered twice finds the marker its first delivery wrote: a job already
        # recorded succeeded stays succeeded (the transition is refused from that state).
        self.move(JobState.SKIPPED, STARTABLE + (JobState.FAILED,), "skip", host=self.host,
                  finished_at=now())
        return self.result | {"state": JobState.SKIPPED}

    def not_wanted(self) -> dict[str, Any]:
        record = self.current()
        if record.get("state") == JobState.CANCELLED:
            self.revoked("cancelled while waiting for its node; not run")
        return self.dropped(f"superseded by message {record.get('task_id')}")

    def attempts(self, done: Path, log: Path, output: Path | None,
                 history: list[dict[str, Any]]) -> dict[str, Any]:
        spec = self.spec
        while True:
            started = time.time()
            start = self.move(JobState.RUNNING, STARTABLE, "start", host=self.host,
                              started_at=round(started, 3), finished_at=None, error=None,
                              exit_code=None, duration_s=None)
            if start.outcome == "cancelled":
                self.move(JobState.CANCELLED, STARTABLE, "cancel", finished_at=now())
                self.revoked("its run was cancelled; not run")
            if not start.ok:
                return self.dropped(f"its record is {start.previous} ({start.outcome})")
            attempt = self.result["attempts"] = start.attempts
            log.parent.mkdir(parents=True, exist_ok=True)
            if output is not None:
                output.parent.mkdir(parents=True, exist_ok=True)
            offset = log.stat().st_size if log.exists() else 0
            log_line(log, f"attempt {attempt} of {spec.job_id} on {self.host} (node {spec.node}, "
                          f"GPU {spec.gpu_id}): {spec.script} {' '.join(spec.args)}")
            exit_code, error, cancelled = self.execute(log, attempt)
            if cancelled:
                log_line(log, "cancelled while running; killed")
                self.revoked("cancelled while running; killed with all it started")
            if error is None:
                error = check_output(output)
            duration = round(time.time() - started, 3)
            with contextlib.suppress(redis.RedisError):  # bookkeeping for metrics only
                tracker().add_busy(spec.node, duration)
            entry = {"attempt": attempt, "host": self.host, "started_at": round(started, 3),
                     "finished_at": now(), "exit_code": exit_code, "error": error}
            history = [*history, entry]
            self.result |= {"exit_code": exit_code, "duration_s": duration, "error": error}
            if error is None:
                return self.succeed(done, log, duration, history)
            tail = output_tail(log, offset)
            if tail:
                error = f"{error}\nlast lines of its output:\n{tail}"
            log_line(log, f"FAILED: {error.splitlines()[0]}")
            if attempt <= spec.retries:
                delay = backoff(spec, attempt)
                log_line(log, f"retrying in {delay:.1f} s (attempt {attempt + 1} of "
                              f"{spec.retries + 1})")
                self.move(JobState.RUNNING, STARTABLE, "retry", error=error,
                          exit_code=exit_code, history=history, retry_at=round(time.time() +
                                                                                delay, 3))
                if not self.pause(delay):
                    return self.not_wanted()
                continue
            self.move(JobState.FAILED, STARTABLE, "fail", exit_code=exit_code,
                      error=error, duration_s=duration, finished_at=now(), history=history)
            self.result |= {"state": JobState.FAILED, "error": error}
            raise JobFailed(f"job {spec.job_id} failed on {self.host} after {attempt} "
                            f"attempt(s): {error}")

    def pause(self, seconds: float) -> bool:
        """Wait out a backoff; False if the job is cancelled or superseded meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(CANCEL_POLL_S, max(0.0, deadline - time.monotonic())))
            if not self.still_wanted():
                return False
        return True

    def execute(self, log: Path, attempt: int) -> tuple[int | None, str | None, bool]:
        """Run the script once: (exit code, error or None, cancelled while running)."""
        spec = self.spec
        try:
            script = find_script(spec.script)
            runner = Runner([sys.executable, str(script), *spec.args], self.base,
                            script_env(spec, attempt), log)
        except JobRefused as err:
            return None, str(err), False
        except OSError as err:
            return None, f"could not start the script: {err}", False
        deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
        while True:
            wait = CANCEL_POLL_S if deadline is None else min(CANCEL_POLL_S,
                                                              deadline - time.monotonic())
            outcome = runner.wait(max(0.0, wait))
            if outcome is not None:
                return describe(outcome)
            if deadline is not None and time.monotonic() >= deadline:
                runner.kill()
                return None, f"timed out after {spec.timeout:g} s; killed", False
            if not self.still_wanted():
                runner.kill()
                return None, "cancelled while running", True

    def succeed(self, done: Path, log: Path, duration: float,
                history: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the marker only if the record agrees (not cancelled, still this message).

        Two steps, so that a record never says ``succeeded`` before the marker exists
        (a follower collecting at once would miss it), and a cancel never races the
        marker: ``finishing`` (a cancel is refused from then on), the marker, then
        ``succeeded``.
        """
        spec = self.spec
        marker = {"run_id": spec.run_id, "job_id": spec.job_id, "node": spec.node,
                  "host": self.host, "output_file": spec.output_file, "duration_s": duration,
                  "finished_at": now()}
        pending = done.with_name(f".{done.name}.{os.getpid()}.pending")
        pending.write_text(json.dumps(marker) + "\n", encoding="utf-8")
        try:
            moved = self.move(JobState.FINISHING, STARTABLE, "finish")
        except redis.RedisError:
            # Redis stayed away for the whole retry window: the job did succeed, so the
            # marker (the truth) is written; the head node settles the record from it.
            moved = Transition("ok", None, self.result["attempts"])
        if moved.outcome == "missing":
            # The record vanished (Redis lost its data): no cancel can have been recorded,
            # and the job did succeed; the marker lets a recovered run skip it.
            moved = Transition("ok", None, self.result["attempts"])
        if not moved.ok:
            pending.unlink(missing_ok=True)
            log_line(log, f"finished, but its record is {moved.previous} ({moved.outcome}): "
                          f"no marker written")
            if moved.outcome == "refused" and moved.previous is JobState.CANCELLED:
                self.revoked("cancelled as it finished; no marker written")
            return self.dropped(f"finished after its record became {moved.previous}")
        os.replace(pending, done)
        log_line(log, f"succeeded in {duration:.2f} s; wrote {done}")
        with contextlib.suppress(redis.RedisError):  # else the head node settles it by .done
            self.move(JobState.SUCCEEDED, (JobState.FINISHING,), "succeed", exit_code=0,
                      error=None, duration_s=duration, finished_at=now(), history=history)
        return self.result | {"state": JobState.SUCCEEDED}


def describe(outcome: Outcome) -> tuple[int | None, str | None, bool]:
    if outcome.error:
        return None, outcome.error, False
    if outcome.signal is not None:
        return -outcome.signal, f"script killed by signal {outcome.signal}", False
    if outcome.exit_code != 0:
        return outcome.exit_code, f"script exited with status {outcome.exit_code}", False
    return 0, None, False


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Any, message: Any = None, *extra: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one planned job (a ``JobSpec`` message); returns a small JSON result."""
    if extra or kwargs:
        message = None  # the contract is exactly one positional message
    try:
        spec = JobSpec.from_message(message)
    except InvalidMessage as err:
        # One line in the log, REJECTED in Flower, the message acknowledged (not requeued).
        logger.error("refused message %s: %s", self.request.id, err)
        self.send_event("task-rejected", requeue=False)
        raise Ignore() from None
    # The worker name (rig-a@machine) says both the node and the machine.
    host = self.request.hostname or socket.gethostname()
    execution = JobExecution(spec, self.request.id, host, self.send_event)
    try:
        return execution.run()
    except (JobFailed, Ignore):
        raise
    except Exception as err:  # a full disk, a permission: the job fails, never stays running
        error = f"worker error: {type(err).__name__}: {err}"
        logger.exception("job %s of run %s: %s", spec.job_id, spec.run_id, error)
        with contextlib.suppress(redis.RedisError):
            execution.move(JobState.FAILED, STARTABLE, "fail", error=error, finished_at=now())
        raise JobFailed(error) from err
