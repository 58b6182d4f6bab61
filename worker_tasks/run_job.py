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
* a failed attempt is retried after a backoff, up to the job's ``retries``
  (``retries.py``); each attempt is an ``Attempt`` value;
* a job that may have a backup copy writes its output to a path of its own, moved into
  place only once its success is claimed; a copy's delivery runs once, and claims the job
  only if it succeeds first (``copies.py``);
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
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn, TypeVar

import redis
from celery import Task
from celery.exceptions import Ignore
from celery.utils.log import get_task_logger
from celery.worker.request import Request

from worker_tasks import halt, warm
from worker_tasks.celery_app import app
from worker_tasks.connections import redis_client
from worker_tasks.copies import outputs_apart, private_output, with_output
from worker_tasks.dependencies import DEPENDENTS_FIELD, Dependencies
from worker_tasks.execution import (
    CancelWatch,
    GpuMemoryWatch,
    Launch,
    Marker,
    OneDelivery,
    SlotHold,
    TimeLimit,
)
from worker_tasks.kinds import fits
from worker_tasks.lease import SlotLease
from worker_tasks.retries import Retries
from worker_tasks.runner import Outcome
from worker_tasks.spec import (
    BUILTIN_SCRIPTS_DIR,
    RUN_JOB_TASK,
    InvalidMessage,
    JobSpec,
    check_name,
    slot_of_worker,
)
from worker_tasks.speeds import SlotSpeeds
from worker_tasks.tracking import (
    OUTPUT_TAIL_HEADER,
    CopyState,
    JobState,
    JobTracker,
    Transition,
    TransitionOutcome,
    error_line,
    now,
    state_of,
)

logger = get_task_logger(__name__)

LOG_TAG = "[scripts-coordinator]"
# How long what a job's end means for others (releases, a halt) waits for Redis (seconds);
# the head's scheduler does it too, so a worker's next job is not held up for it.
AFTER_JOB_RETRY_S = 10.0
# How long tracking writes are retried while Redis is away (seconds), then given up.
TRACKING_RETRY_S = float(os.environ.get("SC_TRACKING_RETRY", "600"))
# A failed job's error carries this much of the end of its output.
TAIL_LINES = 20
TAIL_BYTES = 4096
# Worker settings a script must not inherit (they may hold the broker's password).
PRIVATE_ENV = ("SC_BROKER_URL", "SC_RESULT_BACKEND", "SC_TRACKING_URL", warm.SOCKET_VARIABLE,
               warm.BARE_SOCKET_VARIABLE)
# Worker setting (not a message field): the CUDA device index its jobs get, when the worker
# sees one GPU only (a per-GPU worker in a container with that device).
GPU_DEVICE_VARIABLE = "SC_GPU_DEVICE"
# Fault tests only: the winner of a job waits this long (seconds) between claiming its
# success and moving its output into place, so that a kill can land there.
PAUSE_AFTER_CLAIM_S = float(os.environ.get("SC_FAULT_PAUSE_AFTER_CLAIM", "0"))

T = TypeVar("T")


class JobFailed(Exception):
    """Raised after a failed job is recorded, so Celery and Flower show FAILURE.

    Parameters:
        line: one line (Flower's exception field, the worker's log), the script's own
            last words in it.
        report: the whole error, the script's last output lines included; Flower shows it
            in place of a traceback through the worker (``JobTask.on_failure``).
    """

    def __init__(self, line: str, report: str = "") -> None:
        super().__init__(line)
        self.report = report or line


class JobRequest(Request):  # type: ignore[misc]
    """A job's request on the worker: its ``task-failed`` event carries the runtime too, so
    Flower's Runtime column is filled for a failed job as for one that succeeded (Celery sends
    a runtime with ``task-succeeded`` only)."""

    def send_event(self, type: str, **fields: Any) -> None:  # noqa: A002 (Celery's name)
        if type == "task-failed" and self.time_start:
            fields.setdefault("runtime", round(time.time() - self.time_start, 3))
        super().send_event(type, **fields)


class JobTask(Task):  # type: ignore[misc]
    """The job task's class: a failed job's Flower page reads like the job's own error."""

    Request = JobRequest

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        # Called before the worker reports the failure: the task-failed event (Flower)
        # carries this text as its traceback.
        if isinstance(exc, JobFailed):
            einfo.traceback = exc.report


class JobRefused(Exception):
    """The job asks for what the worker does not allow (a script or path outside its
    directory, a missing script)."""


class ScriptNotFound(JobRefused):
    """No such script in that directory (the next directory may have it)."""


# This project's own job scripts, searched after --scripts-dir.
BUILTIN_SCRIPTS = BUILTIN_SCRIPTS_DIR


def scripts_dir() -> Path:
    return Path(os.environ.get("SC_SCRIPTS_DIR") or os.getcwd()).resolve()


def workdir() -> Path:
    return Path(os.environ.get("SC_WORKDIR") or os.getcwd()).resolve()


@cache
def tracker() -> JobTracker:
    url = os.environ.get("SC_TRACKING_URL") or app.conf.broker_url
    return JobTracker(redis_client(url, socket_connect_timeout=5, socket_timeout=10))


@cache
def dependencies() -> Dependencies:
    """Releases and ends the jobs that wait for the jobs this worker ends."""
    return Dependencies(tracker().client,
                        redis_client(app.conf.broker_url, socket_connect_timeout=5,
                                     socket_timeout=10))


def after_job(spec: JobSpec) -> None:
    """The job's record is final, or this delivery did nothing: the jobs that wait for it
    are released (it succeeded) or ended (it failed for good, or was cancelled). Read from
    the record, so a message delivered again after its job ended releases too (a worker
    killed between the two steps). Redis is waited for ``AFTER_JOB_RETRY_S`` at most: the
    head's scheduler does the same when it follows the run, and the worker's next job is not
    held up longer."""
    record = retrying("read record", lambda: tracker().record(
        spec.run_id, spec.job_id, "state", DEPENDENTS_FIELD), AFTER_JOB_RETRY_S)
    state = state_of(record.get("state"))
    if state is None or not state.is_final:
        return
    reason = retrying("halt", lambda: halt.check(tracker().client, spec.run_id),
                      AFTER_JOB_RETRY_S)
    if reason:
        logger.warning("run %s %s", spec.run_id, reason)
    if record.get(DEPENDENTS_FIELD):
        end_dependents(spec, state)
    # Its run may have ended with it (its dependents too): the runs waiting for it settle.
    retrying("settle waiting runs", lambda: dependencies().after_run_end(spec.run_id),
             AFTER_JOB_RETRY_S)


def end_dependents(spec: JobSpec, state: JobState) -> None:
    """Release or end the jobs of its run that wait for this one, now final as ``state``."""
    if state.is_success:
        released = retrying("release", lambda: dependencies().after_success(
            spec.run_id, spec.job_id), AFTER_JOB_RETRY_S)
        if released:
            logger.info("job %s of run %s released %s", spec.job_id, spec.run_id,
                        ", ".join(released))
    elif state.is_final and state is not JobState.LOST:
        why = "failed" if state is JobState.FAILED else f"was {state}"
        retrying("end dependents", lambda: dependencies().after_failure(
            spec.run_id, spec.job_id, why), AFTER_JOB_RETRY_S)


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


class NotRun(Exception):
    """This delivery must not run (or go on): Flower shows REVOKED, and no result is stored.

    Raised anywhere in a ``JobExecution``; caught once, at the task's edge.
    """

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class Dropped(NotRun):
    """A message that is not the job's current one (stale, or no such job)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"{why}; dropped without running")


@dataclass(frozen=True)
class Attempt:
    """What one run of the script did.

    Parameters:
        number: the attempt's number (from 1), as the record counts them.
        started_at, finished_at: wall-clock times (seconds since the epoch).
        exit_code: the script's status (-N for signal N), None if it never ran or was killed.
        error: why the attempt failed, or None: it succeeded (exit 0, output present).
        cancelled: the job was cancelled while the script ran (it was killed).
        log_offset: where this attempt's output begins in the job's log (bytes).
    """

    number: int
    started_at: float
    finished_at: float
    exit_code: int | None
    error: str | None
    cancelled: bool = False
    log_offset: int = 0
    usage: Usage | None = None

    @property
    def duration_s(self) -> float:
        return round(self.finished_at - self.started_at, 3)

    def history_entry(self, host: str, spec: JobSpec) -> dict[str, Any]:
        """The attempt as its job's history keeps it: where and when it ran, how it ended,
        and what it used (``coordinator acct``)."""
        usage = self.usage or Usage()
        return {"attempt": self.number, "host": host, "node": spec.node, "gpu": spec.gpu_id,
                "started_at": round(self.started_at, 3),
                "finished_at": round(self.finished_at, 3), "elapsed_s": self.duration_s,
                "cpu_s": usage.cpu_s, "max_rss_mb": usage.max_rss_mb,
                "gpu_mem_mb": usage.gpu_mem_mb,
                "exit_code": self.exit_code, "signal": usage.signal, "error": self.error}


@dataclass(frozen=True)
class Usage:
    """What an attempt's process tree used, as its runner counted it (None: not known)."""

    cpu_s: float | None = None
    max_rss_mb: float | None = None
    signal: int | None = None
    gpu_mem_mb: float | None = None  # peak, where NVML can tell (GpuMemoryWatch)

    @classmethod
    def of(cls, outcome: Outcome, gpu: GpuMemoryWatch | None = None) -> Usage:
        return cls(outcome.cpu_s, outcome.max_rss_mb, outcome.signal,
                   gpu.peak_mb if gpu is not None else None)


@dataclass(frozen=True)
class JobPaths:
    """The files of a job, confined to the workdir.

    ``written``: where this execution's script writes the output: the output itself, or,
    for a job that may have a backup copy, a path of this message's own (``copies.py``).
    """

    done: Path
    log: Path
    output: Path | None
    written: Path | None = None


def is_live_copy(record: dict[str, Any], task_id: str) -> bool:
    """The record names ``task_id`` as the job's live backup copy (queued or running)."""
    copy = record.get("copy")
    state = state_of(record.get("state", JobState.QUEUED))
    return (isinstance(copy, dict) and copy.get("task_id") == task_id
            and fits(copy.get("state"), CopyState) and CopyState(copy["state"]).is_live
            and state is not None and not state.is_final)


def as_seen_by(record: dict[str, Any], task_id: str) -> dict[str, Any]:
    """The record as a copy's watch reads it: holding the copy's task id while it is the live
    copy (so that a cancel, a claim by the job's own execution or the job's end stops it)."""
    return {**record, "task_id": task_id} if is_live_copy(record, task_id) else record


class JobExecution:
    """One delivery of one job's message on this worker: from checks to final state.

    Raises ``NotRun`` (the message is stale, or the job was cancelled) or ``JobFailed``.

    Parameters:
        spec: the checked message (a floating job's already placed on this worker's slot).
        task_id: the message's id (must be the job's current one in its record).
        host: the worker's name (``rig-a@machine``).
        floating: the job floats (its message names no node): the record learns its node.
    """

    def __init__(self, spec: JobSpec, task_id: str, host: str, floating: bool = False) -> None:
        self.spec = spec
        self.floating = floating
        self.task_id = task_id
        self.host = host
        self.base = workdir()
        self.retries = Retries(spec.retries, spec.retry_delay)
        self.attempts = 0
        self.as_copy = False  # this delivery is the job's backup copy (set by ``run``)
        self.watch = CancelWatch(lambda: as_seen_by(tracker().record(
            spec.run_id, spec.job_id, "state", "task_id", "copy", "attempts"), task_id),
            task_id, lambda: 0 if self.as_copy else self.attempts)

    # -- tracking ---------------------------------------------------------------------------

    def track(self, what: str, call: Callable[[JobTracker], Transition]) -> Transition:
        """A transition of this job's record (see ``JobTracker``), retried while Redis is away."""
        return retrying(what, lambda: call(tracker()))

    def ids(self) -> tuple[str, str, str, str, int]:
        """The arguments every worker transition starts with."""
        return self.spec.run_id, self.spec.job_id, self.task_id, self.host, self.attempts

    def current(self) -> dict[str, Any]:
        return retrying("read record", lambda: tracker().record(
            self.spec.run_id, self.spec.job_id, "state", "task_id", "copy", "host", "attempts"))

    def result(self, state: JobState, attempt: Attempt | None = None) -> dict[str, Any]:
        """The small JSON result the task returns."""
        return {"job_id": self.spec.job_id, "node": self.spec.node, "host": self.host,
                "exit_code": attempt.exit_code if attempt else None,
                "duration_s": attempt.duration_s if attempt else 0.0, "state": state,
                "error": attempt.error if attempt else None, "attempts": self.attempts}

    # -- the job ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        spec = self.spec
        try:
            paths = self.paths()
        except JobRefused as err:
            self.refuse(str(err))
        record = OneDelivery(tracker().client, self.current, self.task_id, spec.slot,
                             logger.warning).before_lease(self.current())
        if not record:
            raise Dropped("no tracking record (the run expired, or a forged message)")
        if record.get("task_id") != self.task_id:
            if not (spec.copy and is_live_copy(record, self.task_id)):
                raise Dropped(f"superseded by message {record.get('task_id')}")
            self.as_copy = True
        if record.get("state") == JobState.CANCELLED:
            raise NotRun("cancelled; not run")
        if spec.after:
            self.check_released()
        if paths.done.exists():
            if self.as_copy:
                raise Dropped("a backup copy of a job whose .done exists")
            return self.skip()
        hold = SlotHold(SlotLease(tracker().client, spec.slot, self.host, self.task_id),
                        self.watch, retrying)
        if not hold.before_attempts():
            self.not_wanted()
        try:
            return self.run_attempts(paths)
        finally:
            hold.after_attempts()
            if paths.written != paths.output and paths.written is not None:
                paths.written.unlink(missing_ok=True)  # a loser's or a failure's output

    def paths(self) -> JobPaths:
        """The job's files, confined to the workdir (``JobRefused`` if one is not)."""
        spec = self.spec
        output = confine(self.base, spec.output_file, "output_file") if spec.output_file \
            else None
        written = output
        if spec.output_file and spec.speculate and outputs_apart(spec.output_file, spec.args):
            written = confine(self.base, private_output(spec.output_file, self.task_id),
                              "output_file")
        return JobPaths(done=confine(self.base, spec.done_file, "done_file"),
                        log=confine(self.base, spec.log_file, "log_file"), output=output,
                        written=written)

    def check_released(self) -> None:
        """Every job this one waits for (its signed ``after``) succeeded: a message moved
        early by hand, or a record released by a forged edit, runs nothing."""
        spec = self.spec
        states = retrying("read dependencies", lambda: dependencies().waited_states(
            spec.run_id, spec.job_id))
        pending = [name for name in spec.after
                   if states.get(name) is None or not states[name].is_success]
        if pending:
            raise Dropped(f"delivered before it was released: dependency {pending[0]} has "
                          f"not succeeded; not run")

    def refuse(self, why: str) -> NoReturn:
        moved = self.track("refuse", lambda t: t.fail(*self.ids(), error=why))
        if not moved.ok:
            raise Dropped(f"refused ({why}), and its record is {moved.outcome}")
        raise JobFailed(f"job {self.spec.job_id} of run {self.spec.run_id} refused: {why}")

    def skip(self) -> dict[str, Any]:
        # A message delivered twice finds the marker its first delivery wrote: a job already
        # recorded succeeded stays succeeded (the transition is refused from that state).
        self.track("skip", lambda t: t.skip(*self.ids()))
        return self.result(JobState.SKIPPED)

    def not_wanted(self) -> NoReturn:
        record = self.current()
        if record.get("state") == JobState.CANCELLED:
            raise NotRun("cancelled while waiting for its node; not run")
        raise Dropped(f"superseded by message {record.get('task_id')}")

    def when_stopped(self, paths: JobPaths) -> NoReturn:
        """The script was killed: the job was cancelled, or another execution of it (its
        backup copy, or the job's own) claimed it; the step that did so wrote this one's
        history entry."""
        record = self.current()
        if record.get("state") == JobState.CANCELLED:
            log_line(paths.log, "cancelled while running; killed")
            raise NotRun("cancelled while running; killed with all it started")
        if self.watch.overtaken(record):
            why = (f"overtaken: attempt {record['attempts']} of the job started on "
                   f"{record.get('host')} (this worker was taken for dead); attempt "
                   f"{self.attempts} killed")
            log_line(paths.log, why)
            raise Dropped(why)
        why = (f"superseded: the job ended {record.get('state')} or another execution of it "
               f"claimed it (message {record.get('task_id')}); killed")
        log_line(paths.log, why)
        raise Dropped(why)

    def run_attempts(self, paths: JobPaths) -> dict[str, Any]:
        """Attempts until one succeeds, the retry policy gives up, or the job is not wanted;
        a backup copy makes one attempt."""
        spec = self.spec
        while True:
            attempt = self.attempt(paths)
            if attempt.cancelled:
                self.when_stopped(paths)
            if attempt.error is not None:  # a success's is sent with what it teaches
                with contextlib.suppress(redis.RedisError):  # bookkeeping for metrics only
                    tracker().add_busy(spec.node, attempt.duration_s)
            entry = attempt.history_entry(self.host, spec)
            if self.as_copy:
                entry.update(attempt="copy", copy=True)
            if attempt.error is None:
                return self.succeed(paths, attempt, entry)
            if self.as_copy:
                self.after_copy_failed(paths, attempt, entry)
            self.after_failure(paths, attempt, entry)

    def after_copy_failed(self, paths: JobPaths, attempt: Attempt,
                          entry: dict[str, Any]) -> None:
        """The copy's one attempt failed: the job runs on as it was; unless the copy took the
        job over meanwhile (its own execution failed for good), when it fails the job."""
        spec = self.spec
        error = self.with_tail(attempt, paths)
        log_line(paths.log, f"backup copy FAILED: {error.splitlines()[0]}")
        ended = self.track("end copy", lambda t: t.end_copy(spec.run_id, spec.job_id,
                                                            self.task_id, entry))
        if ended.ok:
            raise NotRun(f"backup copy failed ({error_line(error)}); the job runs on")
        if self.current().get("task_id") != self.task_id:
            self.when_stopped(paths)
        self.as_copy = False  # it took the job over: its failure is the job's
        self.retries = Retries(0, spec.retry_delay)

    def after_failure(self, paths: JobPaths, attempt: Attempt, entry: dict[str, Any]) -> None:
        """A failed attempt: wait for the next one (retry policy), or fail the job; unless its
        backup copy runs, which then runs on as the job."""
        spec = self.spec
        error = self.with_tail(attempt, paths)
        log_line(paths.log, f"FAILED: {error.splitlines()[0]}")
        delay = self.retries.after_failure(attempt.number)
        if delay is None:
            handed = self.track("hand over", lambda t: t.hand_over(
                spec.run_id, spec.job_id, self.task_id, {**entry, "error": error_line(error)}))
            if handed.ok:
                log_line(paths.log, "its backup copy runs on as the job")
                raise Dropped(f"failed ({error_line(error)}); its backup copy runs on")
            self.track("fail", lambda t: t.fail(
                *self.ids(), error=error, exit_code=attempt.exit_code,
                duration_s=attempt.duration_s, history_add=[entry]))
            what = (f"job {spec.job_id} of run {spec.run_id} failed on {self.host} after "
                    f"{attempt.number} attempt(s)")
            raise JobFailed(f"{what}: {error_line(error)}", f"{what}\n{error}")
        log_line(paths.log, f"retrying in {delay:.1f} s (attempt {attempt.number + 1} of "
                            f"{spec.retries + 1})")
        self.track("retry", lambda t: t.wait_to_retry(
            *self.ids(), error=error, exit_code=attempt.exit_code, history_add=[entry],
            retry_at=round(time.time() + delay, 3)))
        if not self.watch.while_backing_off(delay):
            self.not_wanted()

    def attempt(self, paths: JobPaths) -> Attempt:
        """Start an attempt in the record, run the script once, judge its output."""
        spec = self.spec
        started = time.time()
        node = spec.node if self.floating else None
        if self.as_copy:
            start = self.track("start copy", lambda t: t.start_copy(
                spec.run_id, spec.job_id, self.task_id, self.host, round(started, 3)))
        else:
            start = self.track("start", lambda t: t.start(
                *self.ids(), started_at=round(started, 3), node=node, workdir=str(self.base)))
        if start.outcome is TransitionOutcome.CANCELLED:
            self.track("cancel", lambda t: t.drop_cancelled(*self.ids()))
            raise NotRun("its run was cancelled; not run")
        if not start.ok:
            raise Dropped(f"its record is {start.previous} ({start.outcome})")
        self.attempts = start.attempts
        paths.log.parent.mkdir(parents=True, exist_ok=True)
        if paths.written is not None:
            paths.written.parent.mkdir(parents=True, exist_ok=True)
        offset = paths.log.stat().st_size if paths.log.exists() else 0
        what = "backup copy" if self.as_copy else f"attempt {self.attempts}"
        args = self.args(paths)
        log_line(paths.log, f"{what} of {spec.job_id} on {self.host} (node {spec.node}, GPU "
                            f"{spec.gpu_id}): {spec.script} {' '.join(args)}")
        exit_code, error, cancelled, usage = self.execute(paths.log, self.attempts, args)
        if error is None and not cancelled:
            error = check_output(paths.written)
        return Attempt(number=self.attempts, started_at=started, finished_at=time.time(),
                       exit_code=exit_code, error=error, cancelled=cancelled, log_offset=offset,
                       usage=usage)

    def with_tail(self, attempt: Attempt, paths: JobPaths) -> str:
        """The attempt's error with the last lines the script wrote in it."""
        assert attempt.error is not None
        tail = output_tail(paths.log, attempt.log_offset)
        return f"{attempt.error}\n{OUTPUT_TAIL_HEADER}\n{tail}" if tail else attempt.error

    def args(self, paths: JobPaths) -> list[str]:
        """The script's arguments: its ``--output-file`` this execution's own, if it has one."""
        spec = self.spec
        if paths.written == paths.output or spec.output_file is None:
            return spec.args
        return with_output(spec.args, spec.output_file,
                           str(paths.written.relative_to(self.base)) if paths.written else "")

    def execute(self, log: Path, attempt: int, args: list[str]
                ) -> tuple[int | None, str | None, bool, Usage | None]:
        """Run the script once: (exit code, error or None, cancelled while running, what its
        process tree used)."""
        spec = self.spec
        launch = Launch(spec.warm, spec.env, self.base, lambda text: log_line(log, text))
        limit = TimeLimit(spec.timeout, lambda: median_of(spec))
        try:
            script = find_script(spec.script)
            argv, env = [sys.executable, str(script), *args], script_env(spec, attempt)
            runner = launch.before_script(argv, env, log)
        except JobRefused as err:
            return None, str(err), False, None
        except OSError as err:
            return None, f"could not start the script: {err}", False, None
        limit.when_script_starts()
        gpu = GpuMemoryWatch(runner.pid)
        try:
            while True:
                outcome = runner.wait(limit.next_wait())
                if outcome is not None:
                    return (*describe(outcome), Usage.of(outcome, gpu))
                gpu.while_running()
                if not limit.while_running():
                    killed = runner.kill()
                    return None, limit.reason(), False, Usage.of(killed, gpu)
                if not self.watch.while_running():
                    killed = runner.kill()
                    return None, "cancelled while running", True, Usage.of(killed, gpu)
        except BaseException:
            # Whatever ends this loop early (a hand-made record the watch cannot read, a
            # bug), the script ends with it: the slot's lease is given back next, and a
            # script left running would share its node with the next job.
            with contextlib.suppress(Exception):  # the error that got here is the one to tell
                runner.kill()
            raise

    def succeed(self, paths: JobPaths, attempt: Attempt,
                entry: dict[str, Any]) -> dict[str, Any]:
        """Write the marker only if the record agrees (not cancelled, still this message).

        Two steps, so that a record never says ``succeeded`` before the marker exists
        (a follower collecting at once would miss it), and a cancel never races the
        marker: ``finishing`` (a cancel is refused from then on), the marker, then
        ``succeeded``.
        """
        spec = self.spec
        done, log, duration = paths.done, paths.log, attempt.duration_s
        marker = Marker(done, {"run_id": spec.run_id, "job_id": spec.job_id, "node": spec.node,
                               "host": self.host, "output_file": spec.output_file,
                               "duration_s": duration, "finished_at": now()})
        marker.before_finish()
        try:
            if self.as_copy:
                moved = self.track("claim", lambda t: t.claim_copy(
                    spec.run_id, spec.job_id, self.task_id, self.host, str(self.base)))
            else:
                moved = self.track("finish", lambda t: t.finish(*self.ids()))
        except redis.RedisError:
            # Redis stayed away for the whole retry window: the job did succeed, so the
            # marker (the truth) is written; the head node settles the record from it.
            moved = Transition(TransitionOutcome.OK, None, self.attempts)
        if moved.outcome is TransitionOutcome.MISSING:
            # The record vanished (Redis lost its data): no cancel can have been recorded,
            # and the job did succeed; the marker lets a recovered run skip it.
            moved = Transition(TransitionOutcome.OK, None, self.attempts)
        if not moved.ok:
            marker.when_refused()
            log_line(log, f"finished, but its record is {moved.previous} ({moved.outcome}): "
                          f"no marker written")
            if (moved.outcome is TransitionOutcome.REFUSED
                    and moved.previous is JobState.CANCELLED):
                raise NotRun("cancelled as it finished; no marker written")
            raise Dropped(f"finished after its record became {moved.previous}")
        if paths.written != paths.output and paths.written and paths.output:
            if PAUSE_AFTER_CLAIM_S:
                time.sleep(PAUSE_AFTER_CLAIM_S)
            os.replace(paths.written, paths.output)  # the winner's output, once claimed
        marker.after_finish()
        log_line(log, f"succeeded in {duration:.2f} s; wrote {done}")
        # Before the record says succeeded: whoever sees the success sees what it taught.
        with contextlib.suppress(redis.RedisError):  # busy time; "P%" timeouts; slot speeds
            teach = tracker().client.pipeline(transaction=False)  # one round trip for all
            tracker().add_busy(spec.node, duration, teach)
            tracker().add_duration(spec.run_id, spec.script, duration, teach)
            SlotSpeeds(tracker().client).after_success(spec.script, spec.slot, duration,
                                                       spec.cost or 1.0, teach)
            teach.execute()
        with contextlib.suppress(redis.RedisError):  # else the head node settles it by .done
            self.track("succeed", lambda t: t.succeed(*self.ids(), duration_s=duration,
                                                      history_add=[entry]))
        return self.result(JobState.SUCCEEDED, attempt)


def revoked_reason(spec: JobSpec, why: str) -> str:
    """Why a delivery did not run: the record's own error when it was ended for a reason (a
    halt, a dependency), else what the worker found."""
    with contextlib.suppress(redis.RedisError):
        error = tracker().record(spec.run_id, spec.job_id, "error").get("error")
        if error and error != "cancelled":
            return str(error)
    return why


def median_of(spec: JobSpec) -> tuple[float, int] | None:
    """The median duration of the run's succeeded jobs of this script (a ``"P%"`` timeout),
    or None: too few yet, or Redis away (the job then runs without a limit meanwhile)."""
    try:
        return tracker().median(spec.run_id, spec.script)
    except redis.RedisError:
        return None


def describe(outcome: Outcome) -> tuple[int | None, str | None, bool]:
    if outcome.error:
        return None, outcome.error, False
    if outcome.signal is not None:
        return -outcome.signal, f"script killed by signal {outcome.signal}", False
    if outcome.exit_code != 0:
        return outcome.exit_code, f"script exited with status {outcome.exit_code}", False
    return 0, None, False


def fail_refused(message: Any, task_id: str, host: str, why: str) -> bool:
    """A refused message of a job whose record holds it fails that job, the refusal its error
    (the job would otherwise wait, then be found lost). True if a record was failed."""
    if not isinstance(message, dict):
        return False
    try:
        run_id = check_name(message.get("run_id"), "run_id")
        job_id = check_name(message.get("job_id"), "job_id")
    except InvalidMessage:
        return False
    with contextlib.suppress(redis.RedisError):
        error = f"refused by the worker: {why}"
        return tracker().fail(run_id, job_id, task_id, host, 0, error=error).ok
    return False


# A failed job is an expected outcome: Celery logs it in one line, without a traceback.
@app.task(name=RUN_JOB_TASK, bind=True, base=JobTask, throws=(JobFailed,))
def run_job(self: Any, message: Any = None, *extra: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one planned job (a ``JobSpec`` message); returns a small JSON result."""
    if extra or kwargs:
        message = None  # the contract is exactly one positional message
    # The worker name (rig-a@machine) says both the node and the machine.
    host = self.request.hostname or socket.gethostname()
    try:
        spec = JobSpec.from_message(message)
    except InvalidMessage as err:
        # One line in the log, REJECTED in Flower, the message acknowledged (not requeued).
        failed = fail_refused(message, self.request.id, host, str(err))
        logger.error("refused message %s: %s%s", self.request.id, err,
                     "; its job is failed" if failed else "")
        self.send_event("task-rejected", requeue=False)
        raise Ignore() from None
    floating = spec.floating
    if floating:  # the first free slot took it: it runs as a job of this worker's slot
        try:
            spec = spec.placed_on(check_name(slot_of_worker(host), "worker slot"))
        except InvalidMessage as err:
            logger.error("refused floating job %s of run %s: this worker's name %r names no "
                         "slot (%s)", spec.job_id, spec.run_id, host, err)
            self.send_event("task-rejected", requeue=False)
            raise Ignore() from None
    execution = JobExecution(spec, self.request.id, host, floating)
    try:
        result = execution.run()
        with contextlib.suppress(redis.RedisError):  # else the head's scheduler releases
            after_job(spec)
        return result
    except NotRun as stop:
        # A cancelled or stale delivery: REVOKED in Flower, and no result is stored.
        logger.warning("job %s of run %s (message %s): %s", spec.job_id, spec.run_id,
                       self.request.id, stop.why)
        # Flower shows the reason (a halt, a cancel) on the REVOKED task: its "exception".
        self.send_event("task-revoked", terminated=False, signum=None, expired=False,
                        exception=revoked_reason(spec, stop.why))
        with contextlib.suppress(redis.RedisError):
            after_job(spec)
        raise Ignore() from None
    except JobFailed:
        with contextlib.suppress(redis.RedisError):
            after_job(spec)
        raise
    except Exception as err:  # a full disk, a permission: the job fails, never stays running
        error = f"worker error: {type(err).__name__}: {err}"
        logger.exception("job %s of run %s: %s", spec.job_id, spec.run_id, error)
        with contextlib.suppress(redis.RedisError):
            execution.track("fail", lambda t: t.fail(*execution.ids(), error=error))
        raise JobFailed(error) from err
