"""The task that runs one script job on a node and writes its ``.done`` marker.

Success is a file: the script exits 0, its output file exists (and parses, for
``.json``), and only then ``<output-file>.done`` is written, atomically. A job
whose marker already exists is skipped, so a redelivered message or a resumed
run never runs a finished job twice.

Worker settings (environment variables, set by ``coordinator worker``):
    SC_SCRIPTS_DIR   where job scripts are looked up (default: current directory)
    SC_WORKDIR       where scripts run and relative paths resolve (default: current directory)
    SC_TRACKING_URL  the Redis holding run records (default: the broker URL)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import redis
from celery.utils.log import get_task_logger

from worker_tasks.app import app
from worker_tasks.spec import RUN_JOB_TASK, JobSpec, is_protected_env
from worker_tasks.tracking import JobState, JobTracker, now

logger = get_task_logger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option: signal the script when its worker process dies
LOG_TAG = "[scripts-coordinator]"


class JobFailed(Exception):
    """Raised after a failed job is recorded, so Celery and Flower show FAILURE."""


class JobRefused(Exception):
    """The job asks for what the worker does not allow (a script outside the scripts
    directory, a missing script, protected environment variables)."""


def scripts_dir() -> Path:
    return Path(os.environ.get("SC_SCRIPTS_DIR") or os.getcwd()).resolve()


def workdir() -> Path:
    return Path(os.environ.get("SC_WORKDIR") or os.getcwd()).resolve()


@cache
def tracker() -> JobTracker:
    url = os.environ.get("SC_TRACKING_URL") or app.conf.broker_url
    return JobTracker(redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10))


def track(run_id: str, job_id: str, **fields: Any) -> None:
    # Tracking is bookkeeping: a Redis hiccup must not fail a job whose marker is written.
    try:
        tracker().update(run_id, job_id, **fields)
    except redis.RedisError as err:
        logger.warning("tracking update for %s/%s failed: %s", run_id, job_id, err)


def resolve_script(base: Path, script: str) -> Path:
    """The script's real path, refused unless it lies inside ``base``."""
    rel = PurePosixPath(script)
    if rel.is_absolute() or ".." in rel.parts:
        raise JobRefused(f"script {script!r} is not a path inside {base}; refused")
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise JobRefused(f"script {script!r} resolves outside {base} (symlink); refused")
    if not path.is_file():
        raise JobRefused(f"script {script!r} not found in scripts directory {base}")
    return path


def in_workdir(path: str, base: Path) -> Path:
    return (base / path) if not os.path.isabs(path) else Path(path)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _child_setup() -> None:
    # Own process group (a timeout kills the script's children too), and die with the worker.
    os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_script(spec: JobSpec, script: Path, base: Path, log: Path) -> tuple[int, str | None]:
    """Run the script; returns (exit code, error text or None)."""
    env = dict(os.environ)
    refused = sorted(name for name in spec.env if is_protected_env(name))
    if refused:
        raise JobRefused(f"job env may not set {', '.join(refused)}; refused")
    env.update(spec.env)
    env.update(
        CUDA_VISIBLE_DEVICES=str(spec.gpu_id),
        SC_RUN_ID=spec.run_id,
        SC_JOB_ID=spec.job_id,
        SC_NODE=spec.node,
        PYTHONUNBUFFERED="1",
    )
    with log.open("ab") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, str(script), *spec.args],
            cwd=base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,
        )
        try:
            return proc.wait(timeout=spec.timeout), None
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -signal.SIGKILL, f"timed out after {spec.timeout:g} s; killed"
        finally:
            if proc.poll() is None:  # the task itself was interrupted
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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


def execute(spec: JobSpec, host: str) -> dict[str, Any]:
    """Run one job by the ``.done`` rule and record it; the task's body.

    Whatever goes wrong on the worker's side (a full disk, a permission) is
    recorded as the job's failure: a job is never left ``running`` by an error.
    """
    try:
        return run_by_done_rule(spec, host)
    except JobFailed:
        raise
    except Exception as err:
        error = f"worker error: {type(err).__name__}: {err}"
        track(spec.run_id, spec.job_id, state=JobState.FAILED, error=error, finished_at=now())
        raise JobFailed(error) from err


def run_by_done_rule(spec: JobSpec, host: str) -> dict[str, Any]:
    base = workdir()
    done = in_workdir(spec.done_file, base)
    log = in_workdir(spec.log_file, base)
    output = in_workdir(spec.output_file, base) if spec.output_file else None
    result: dict[str, Any] = {
        "job_id": spec.job_id, "node": spec.node, "host": host,
        "exit_code": None, "duration_s": 0.0, "state": None, "error": None,
    }
    if done.suffix != ".done" or log.suffix != ".log":
        raise ValueError(f"refused: marker {done} / log {log} do not end in .done / .log")

    if done.exists():
        try:
            tracker().mark_skipped(spec.run_id, spec.job_id, host=host, finished_at=now())
        except redis.RedisError as err:
            logger.warning("tracking skip for %s failed: %s", spec.job_id, err)
        return result | {"state": JobState.SKIPPED}
    if tracker_cancelled(spec.run_id):
        track(spec.run_id, spec.job_id, state=JobState.CANCELLED, finished_at=now())
        return result | {"state": JobState.CANCELLED}

    log.parent.mkdir(parents=True, exist_ok=True)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    attempt = start_attempt(spec, host, started)
    log_line(log, f"attempt {attempt} of {spec.job_id} on {host} (node {spec.node}, "
                  f"GPU {spec.gpu_id}): {spec.script} {' '.join(spec.args)}")
    try:
        script = resolve_script(scripts_dir(), spec.script)
        exit_code, error = run_script(spec, script, base, log)
    except JobRefused as err:
        exit_code, error = None, str(err)
    except OSError as err:
        exit_code, error = None, f"could not start the script: {err}"
    if error is None and exit_code != 0:
        error = f"script exited with status {exit_code}"
    if error is None:
        error = check_output(output)
    duration = round(time.time() - started, 3)

    if error is None:
        marker = {"run_id": spec.run_id, "job_id": spec.job_id, "node": spec.node, "host": host,
                  "output_file": spec.output_file, "duration_s": duration, "finished_at": now()}
        write_atomically(done, json.dumps(marker) + "\n")
        state = JobState.SUCCEEDED
        log_line(log, f"succeeded in {duration:.2f} s; wrote {done}")
    else:
        state = JobState.FAILED
        log_line(log, f"FAILED: {error}")
    track(spec.run_id, spec.job_id, state=state, exit_code=exit_code, error=error,
          duration_s=duration, finished_at=now())
    result |= {"exit_code": exit_code, "duration_s": duration, "state": state, "error": error}
    if state is JobState.FAILED:
        raise JobFailed(json.dumps(result))
    return result


def tracker_cancelled(run_id: str) -> bool:
    try:
        return tracker().run_cancelled(run_id)
    except redis.RedisError:
        return False


def start_attempt(spec: JobSpec, host: str, started: float) -> int:
    try:
        return tracker().start_attempt(spec.run_id, spec.job_id, host=host,
                                       started_at=round(started, 3), error=None)
    except redis.RedisError as err:
        logger.warning("tracking start for %s failed: %s", spec.job_id, err)
        return 0


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Run one planned job (a ``JobSpec`` message); returns a small JSON result."""
    spec = JobSpec.from_message(message)
    # The worker name (rig-a@machine) says both the node and the machine.
    host = self.request.hostname or socket.gethostname()
    return execute(spec, host)
