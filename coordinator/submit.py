"""Publishing a run: validate all, plan, record the run in Redis, then publish.

Order matters for "nothing half-published": the whole file is validated and
planned before Redis is touched; the run and its jobs are recorded in one
transaction; then messages go out. If the broker fails half-way, the run is
marked cancelled, so workers drop the messages that did get out. Cancelling
and retrying a run are here too: they publish (or unpublish) jobs.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from coordinator import legacy
from coordinator.broker import check_broker, publisher, redact
from coordinator.errors import BrokerUnreachableError, InvalidJobsError
from coordinator.jobs import Job, LegacyScoringJob, load_jobs
from coordinator.plan import Plan, plan_jobs
from coordinator.records import read_spec, read_status
from worker_tasks.spec import RUN_JOB_TASK, JobSpec, queue_for
from worker_tasks.tracking import (
    RUN_TTL_S,
    JobState,
    RunState,
    encode,
    job_key,
    jobs_key,
    run_key,
    runs_key,
)
from worker_tasks.tracking import now as timestamp

DEFAULT_OUTPUT_DIR = "full_scoring_results"
DEFAULT_CHUNK_DIR = "scoring_chunks"

JobsInput = str | Path | Sequence[dict[str, Any]]
# Maps a jobs file's node name to the queue label that serves it (None: no such node).
NodeResolver = Callable[[str], str | None]


def new_run_id() -> str:
    """Sortable and readable: ``20261129-081500-3f9a1c``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def prepare(
    jobs: JobsInput,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    preserve_paths: bool = False,
    chunk_dir: str = DEFAULT_CHUNK_DIR,
    run_id: str | None = None,
    resolve_node: NodeResolver | None = None,
) -> tuple[Plan, list[legacy.Conversion]]:
    """Validate and plan a run; returns the plan and the legacy conversions.

    ``resolve_node`` (from an inventory) maps each job's node name to a node label
    and refuses a node it does not know. Raises ``InvalidJobsError`` (exit 2)
    before anything is written or published. Nothing is written: legacy chunk
    files are written by ``legacy.write_chunks``.
    """
    entries = load_jobs(jobs)
    if resolve_node is not None:
        entries = resolve_nodes(entries, resolve_node)
    conversions = legacy.convert_all(entries, chunk_dir=chunk_dir, output_dir=output_dir)
    script_jobs: list[Job] = [
        conversion.job if conversion else entry
        for entry, conversion in zip(entries, conversions, strict=True)
    ]
    plan = plan_jobs(script_jobs, run_id or new_run_id(), output_dir, preserve_paths)
    return plan, [conversion for conversion in conversions if conversion]


def resolve_nodes(entries: list[Job | LegacyScoringJob],
                  resolve_node: NodeResolver) -> list[Job | LegacyScoringJob]:
    """Each job's node as an inventory label; a node the inventory lacks is exit 2."""
    resolved: list[Job | LegacyScoringJob] = []
    for index, entry in enumerate(entries):
        label = resolve_node(entry.node)
        if label is None:
            raise InvalidJobsError(
                f"jobs: job {index} (job_id {entry.job_id!r}): field 'node': {entry.node!r} is "
                f"not in the cluster inventory (add [nodes.{entry.node}] or fix the node)")
        resolved.append(entry if label == entry.node
                        else entry.model_copy(update={"node": label}))
    return resolved


def record_run(client: redis.Redis, plan: Plan) -> None:
    """Create the run and its queued jobs in one transaction."""
    created = timestamp()
    pipe = client.pipeline(transaction=True)
    pipe.hset(run_key(plan.run_id), mapping=encode({
        "run_id": plan.run_id,
        "state": RunState.PUBLISHING,
        "created_at": created,
        "output_dir": plan.output_dir,
        "preserve_paths": plan.preserve_paths,
        "jobs_total": len(plan.specs),
        "nodes": sorted(plan.by_node()),
        "submitted_from": socket.gethostname(),
    }))
    pipe.rpush(jobs_key(plan.run_id), *[spec.job_id for spec in plan.specs])
    for spec in plan.specs:
        pipe.hset(job_key(plan.run_id, spec.job_id), mapping=encode(queued_record(spec, created)))
    for key in [run_key(plan.run_id), jobs_key(plan.run_id)] + [
        job_key(plan.run_id, spec.job_id) for spec in plan.specs
    ]:
        pipe.expire(key, RUN_TTL_S)
    pipe.zadd(runs_key(), {plan.run_id: created})
    pipe.zremrangebyscore(runs_key(), 0, created - RUN_TTL_S)  # runs whose records expired
    pipe.execute()


def task_id_for(spec: JobSpec, generation: int = 0) -> str:
    """Readable in Flower: ``<run>.<job>.<generation>`` (generation grows with retries)."""
    return f"{spec.run_id}.{spec.job_id}.{generation}"


def queued_record(spec: JobSpec, queued_at: float) -> dict[str, Any]:
    return {
        "job_id": spec.job_id, "node": spec.node, "gpu_id": spec.gpu_id,
        "script": spec.script, "args": spec.args, "output_file": spec.output_file,
        "done_file": spec.done_file, "log_file": spec.log_file,
        "state": JobState.QUEUED, "attempts": 0, "queued_at": queued_at,
        "started_at": None, "finished_at": None, "exit_code": None,
        "duration_s": None, "error": None, "host": None,
        "task_id": task_id_for(spec),
        "spec": spec.to_message(),
    }


def publish(
    client: redis.Redis, specs: Sequence[JobSpec], app: Celery, generation: int = 0
) -> None:
    """Send each job to its node's queue; raises ``BrokerUnreachableError`` on failure."""
    try:
        with app.producer_or_acquire() as producer:
            for spec in specs:
                task_id = task_id_for(spec, generation)
                app.send_task(
                    RUN_JOB_TASK,
                    args=[spec.to_message()],
                    queue=queue_for(spec.node),
                    task_id=task_id,
                    producer=producer,
                    retry=False,
                )
                client.hset(job_key(spec.run_id, spec.job_id), "task_id", json.dumps(task_id))
    except (OperationalError, OSError, redis.RedisError) as err:
        message = f"broker {redact(app.conf.broker_url)} failed while publishing: {err}"
        raise BrokerUnreachableError(message) from None


def publish_run(
    plan: Plan,
    conversions: Sequence[legacy.Conversion],
    client: redis.Redis,
    app: Celery,
    workdir: str | Path = ".",
    before_publish: Callable[[Plan], None] | None = None,
) -> None:
    """Record and publish a prepared run; the broker must have answered ``check_broker``.

    ``before_publish`` runs once the input is known good and Redis is up, before
    anything is recorded (pushing input files to nodes, say); if it raises,
    nothing was published.
    """
    # Only now, with the input valid and Redis up, are legacy chunk files written.
    legacy.write_chunks(conversions, Path(workdir))
    if before_publish is not None:
        before_publish(plan)
    record_run(client, plan)
    try:
        publish(client, plan.specs, app)
    except BrokerUnreachableError:
        # Workers drop messages of a cancelled run: the half that got out is harmless.
        with contextlib.suppress(redis.RedisError):
            client.hset(run_key(plan.run_id), "state", json.dumps(RunState.CANCELLED))
        raise
    client.hset(run_key(plan.run_id), "state", json.dumps(RunState.ACTIVE))


def latest_run_id(client: redis.Redis) -> str | None:
    newest = client.zrevrange(runs_key(), 0, 0)
    return newest[0].decode() if newest else None


def cancel_run(client: redis.Redis, run_id: str, broker_url: str | None) -> int:
    """Mark the run cancelled, drop its queued jobs and terminate its running ones."""
    status = read_status(client, run_id)
    client.hset(run_key(run_id), "state", json.dumps(RunState.CANCELLED))
    app = publisher(broker_url)
    stopped = 0
    for job in status.jobs:
        if job.state is JobState.QUEUED:
            client.hset(job_key(run_id, job.job_id), mapping=encode(
                {"state": JobState.CANCELLED, "finished_at": timestamp()}))
            stopped += 1
        elif job.state is JobState.RUNNING and job.task_id:
            app.control.revoke(job.task_id, terminate=True, signal="SIGTERM")
            client.hset(job_key(run_id, job.job_id), mapping=encode(
                {"state": JobState.CANCELLED, "finished_at": timestamp(),
                 "error": "cancelled while running"}))
            stopped += 1
    return stopped


def retry_failed(client: redis.Redis, run_id: str, broker_url: str | None) -> int:
    """Publish failed and cancelled jobs again, each with a fresh task id."""
    retry = [job for job in read_status(client, run_id).jobs
             if job.state in (JobState.FAILED, JobState.CANCELLED)]
    if not retry:
        return 0
    app = publisher(broker_url)
    check_broker(app)
    specs = [JobSpec.from_message(read_spec(client, run_id, job.job_id)) for job in retry]
    pipe = client.pipeline(transaction=True)
    for job in retry:
        pipe.hset(job_key(run_id, job.job_id), mapping=encode(
            {"state": JobState.QUEUED, "queued_at": timestamp(), "error": None,
             "finished_at": None, "exit_code": None}))
    pipe.hset(run_key(run_id), "state", json.dumps(RunState.ACTIVE))
    pipe.execute()
    publish(client, specs, app, generation=max(job.attempts for job in retry) + 1)
    return len(specs)
