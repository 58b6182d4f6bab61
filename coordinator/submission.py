"""Publishing a run: validate all, plan, record the run in Redis, then publish.

Order matters for "nothing half-published": the whole file is validated and
planned before Redis is touched; the run and its jobs are recorded (pipelined,
in chunks); then messages go out in batches (kombu's ``Producer.batch``: the
queue pushes of a batch travel in one pipeline). If the broker fails half-way,
the run is marked cancelled, so workers drop the messages that did get out.
Republishing a run's jobs (retry, move, recover) is here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import BatchPublishError, KombuError
from kombu.serialization import dumps

from coordinator.broker import redact
from coordinator.errors import BrokerUnreachableError, InvalidJobsError
from coordinator.jobs import Job, LegacyScoringJob, iter_load_jobs
from coordinator.legacy import Conversion, convert, write_chunks
from coordinator.options import DEFAULTS, SubmitOptions
from coordinator.plan import Plan, plan_jobs
from worker_tasks.connections import redis_client
from worker_tasks.dependencies import (
    AFTER_ANY,
    AFTER_OK,
    AFTER_RUNS_FIELD,
    DEPENDENTS_FIELD,
    RELEASE_TO_FIELD,
    Dependencies,
    hold_queue,
)
from worker_tasks.halt import HALT_FIELD, Halt
from worker_tasks.signing import AUTH_SERIALIZER
from worker_tasks.spec import FLOATING_NODE, RUN_JOB_TASK, JobSpec
from worker_tasks.tracking import (
    CANCELLABLE,
    SPEC_FIELDS,
    JobState,
    JobTracker,
    RunState,
    jobs_key,
    run_key,
)
from worker_tasks.tracking import now as timestamp

# Jobs per Redis pipeline and per publish batch: large enough to amortise round trips,
# small enough to keep each pipeline's memory modest.
BATCH_SIZE = int(os.environ.get("SC_PUBLISH_BATCH", "2000"))
# How long publishing waits for Sentinel to promote a new master when the broker is lost
# mid-run (seconds); a plain redis:// broker is not waited for (the run is cancelled).
FAILOVER_WAIT_S = float(os.environ.get("SC_FAILOVER_TIMEOUT", "60"))
# Threads that sign a batch's messages (RSA signing runs outside the GIL).
SIGNING_THREADS = max(1, min(8, os.cpu_count() or 1))
# How much of a job's command line Flower shows (the message header ``argsrepr``).
ARGSREPR_CHARS = 200
# AMQP delivery mode 2: the broker keeps the message across a restart (Redis with AOF).
PERSISTENT = 2

JobsInput = str | Path | Sequence[dict[str, Any]]
# Maps a jobs file's node name to the queue label that serves it (None: no such node).
NodeResolver = Callable[[str], str | None]


def new_run_id() -> str:
    """Sortable and readable: ``20261129-081500-3f9a1c``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def prepare(jobs: JobsInput, options: SubmitOptions = DEFAULTS,
            run_id: str | None = None) -> Plan:
    """Validate and plan a run: the plan ``publish_run`` records and sends as it is.

    Node names are resolved through ``options.inventory`` (labels or hosts; a node it
    lacks is refused). Raises ``InvalidJobsError`` (exit 2) before anything is written or
    published: legacy chunk files are written only when the plan is published.
    """
    conversions: list[Conversion] = []
    resolve_node = options.inventory.resolve if options.inventory is not None else None

    def script_jobs() -> Iterator[Job]:
        # One job at a time from the file to the plan: the raw entries, their models and
        # the plan of a 100,000-job file are never all in memory at once.
        for index, entry in enumerate(iter_load_jobs(jobs)):
            if resolve_node is not None:
                entry = resolve_node_of(index, entry, resolve_node)
            if isinstance(entry, LegacyScoringJob):
                conversion = convert(entry, index, options.chunk_dir, options.output_dir)
                conversions.append(conversion)
                yield conversion.job
            else:
                yield entry

    plan = plan_jobs(script_jobs(), run_id or new_run_id(), options)
    jobs_file = str(Path(jobs).resolve()) if isinstance(jobs, str | Path) else None
    return dataclasses.replace(plan, conversions=tuple(conversions), jobs_file=jobs_file)


def resolve_node_of(index: int, entry: Job | LegacyScoringJob,
                    resolve_node: NodeResolver) -> Job | LegacyScoringJob:
    """The job with its node as an inventory label; a node the inventory lacks is exit 2."""
    label = resolve_node(entry.node)
    if label is None:
        raise InvalidJobsError(
            f"jobs: job {index} (job_id {entry.job_id!r}): field 'node': {entry.node!r} is "
            f"not in the cluster inventory (add [nodes.{entry.node}] or fix the node)")
    return entry if label == entry.node else entry.model_copy(update={"node": label})


def task_id_for(spec: JobSpec, generation: int = 0) -> str:
    """Readable in Flower: ``<run>.<job>.<generation>`` (generation grows with republishing)."""
    return f"{spec.run_id}.{spec.job_id}.{generation}"


def next_generation(record: dict[str, Any]) -> int:
    """The generation of a job's next message: past its current one's and its copy's."""
    ids = [record.get("task_id"), (record.get("copy") or {}).get("task_id")]
    return 1 + max((int(tail) for tail in (str(task_id or "0").rsplit(".", 1)[-1]
                                           for task_id in ids) if tail.isdigit()), default=0)


# Message fields a record leaves out when they hold their default (smaller records): the
# message contract's own defaults, and a job without an output file.
UNSTORED_DEFAULTS = {**JobSpec.defaults(), "output_file": None}


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """The message fields a record keeps (``spec``): defaults and the job id left out."""
    fields = ((name, getattr(spec, name)) for name in SPEC_FIELDS if name != "job_id")
    return {name: value for name, value in fields
            if name not in UNSTORED_DEFAULTS or value != UNSTORED_DEFAULTS[name]}


def spec_from_record(run_id: str, record: dict[str, Any]) -> JobSpec:
    """The job's message rebuilt from its record (the stored spec, and its current node)."""
    return JobSpec.from_message({**record["spec"], "run_id": run_id, "node": record["node"],
                                 "job_id": record["job_id"]})


def chunks(items: Sequence[Any], size: int = BATCH_SIZE) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def record_run(client: redis.Redis, plan: Plan, extra: dict[str, Any] | None = None,
               done: frozenset[str] | set[str] = frozenset()) -> None:
    """Create the run (state ``publishing``) and its queued jobs, in chunks, server-side.

    Jobs in ``done`` (a recovered run's finished jobs) are recorded ``skipped``. The
    run's metadata is written last: until then no reader sees a half-recorded run.
    """
    created = timestamp()
    run_id = plan.run_id
    tracker = JobTracker(client)
    for part in chunks(plan.specs):
        pipe = client.pipeline(transaction=False)
        tracker.create_jobs(run_id, [(spec.job_id, json.dumps(stored_spec(spec)),
                                      json.dumps(spec.node), json.dumps(task_id_for(spec)))
                                     for spec in part], created, client=pipe)
        pipe.execute()
    held = held_jobs(plan, done)
    marked = [(spec.job_id, {"pin": True}) for spec in plan.specs if spec.job_id in plan.pinned]
    marked += [(spec.job_id, {"state": JobState.HELD, RELEASE_TO_FIELD: spec.queue})
               for spec in plan.specs if spec.job_id in held]
    marked += [(job_id, {DEPENDENTS_FIELD: dependents})
               for job_id, dependents in dependents_of(plan).items()]
    marked += [(spec.job_id, {"floating": True}) for spec in plan.specs if spec.floating]
    marked += [(job_id, {"state": JobState.SKIPPED, "finished_at": created,
                         "error": "recovered: its .done existed"}) for job_id in sorted(done)]
    for part in chunks(marked):
        pipe = client.pipeline(transaction=False)
        for job_id, fields in part:
            tracker.mark(run_id, job_id, client=pipe, **fields)
        pipe.execute()
    metadata = {
        "output_dir": plan.output_dir,
        "preserve_paths": plan.preserve_paths,
        "jobs_total": len(plan.specs),
        "nodes": sorted(plan.by_node()),
        "jobs_per_node": plan.jobs_per_node(),
        "slots": plan.slots(),
        "jobs_per_slot": plan.jobs_per_slot(),
        "jobs_file": plan.jobs_file,
        "scripts": sorted({spec.script for spec in plan.specs}),
        "plan_digest": plan.digest(),
        "workdir": str(plan.options.workdir.resolve()),
        "per_gpu": plan.options.per_gpu,
        "recovered_jobs": len(done),
        "submitted_from": socket.gethostname(),
        **({HALT_FIELD: Halt.parse(plan.options.halt).as_dict()}
           if plan.options.halt else {}),
        **({AFTER_RUNS_FIELD: dict.fromkeys(plan.options.after_runs,
                                            AFTER_ANY if plan.options.after_any else AFTER_OK)}
           if plan.options.after_runs else {}),
        **(extra or {}),
    }
    tracker.create_run(run_id, metadata, {JobState.QUEUED: len(plan.specs) - len(done) -
                                          len(held), JobState.HELD: len(held),
                                          JobState.SKIPPED: len(done)}, created)


def held_jobs(plan: Plan, done: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """The jobs that wait for a job of the run not already done (recovered ones count as
    succeeded): recorded ``held``, published into their hold lists."""
    if plan.options.after_runs:  # the whole run waits for other runs
        return {spec.job_id for spec in plan.specs if spec.job_id not in done}
    return {spec.job_id for spec in plan.specs
            if spec.job_id not in done and any(name not in done for name in spec.after)}


def dependents_of(plan: Plan) -> dict[str, list[str]]:
    """job -> the jobs that wait for it, in jobs-file order."""
    dependents: dict[str, list[str]] = {}
    for spec in plan.specs:
        for name in spec.after:
            dependents.setdefault(name, []).append(spec.job_id)
    return dependents


def publish(specs: Sequence[JobSpec], app: Celery, task_ids: Sequence[str],
            on_batch: Callable[[int], None] | None = None,
            held: frozenset[str] | set[str] = frozenset()) -> None:
    """Send each job to its node's queue, in batches; ``BrokerUnreachableError`` on failure.

    The messages are Celery's own protocol-2 messages, built by Celery
    (``app.amqp.as_task_v2``) and published as ``send_task`` would; what differs is only
    that the per-call option handling is done once, that kombu's batching groups the
    Redis pushes into pipelines, and that each batch's ``task-sent`` events travel as one
    event message (see ``publish_sent_events``). ``on_batch`` hears how many jobs each
    batch the broker took held. Jobs in ``held`` go into their hold lists, not their
    queues (``worker_tasks.dependencies``).
    """
    amqp = app.amqp
    sent_events = bool(app.conf.task_send_sent_event)
    # Signed when the publisher registered the head's key (coordinator.broker.publisher).
    serializer = AUTH_SERIALIZER if app.conf.get("sc_sign_jobs") else "json"
    try:
        # A connection of its own (not the app's pool): after a failover, a pooled one
        # would still point at the lost master.
        with app.connection_for_write() as connection, ThreadPoolExecutor(
                max_workers=SIGNING_THREADS if serializer == AUTH_SERIALIZER else 1) as pool:
            producer = app.amqp.Producer(connection, auto_declare=False)
            # Each node's queue is declared once, not once per message.
            for queue in {spec.queue for spec in specs if spec.job_id not in held}:
                producer.maybe_declare(amqp.queues[queue])
            dispatcher = app.events.Dispatcher(producer.connection, enabled=False)
            batches = encoded_batches(amqp, specs, task_ids, sent_events, serializer, pool)
            for part, jobs, encoded in batches:
                with producer.batch(max_size=BATCH_SIZE + 1):
                    for spec, job, (content_type, encoding, data) in zip(
                            part, jobs, encoded, strict=True):
                        where = (hold_queue(spec.run_id, spec.job_id)
                                 if spec.job_id in held else job.queue)
                        producer.publish(data, exchange="", routing_key=where,
                                         headers=job.headers, content_type=content_type,
                                         content_encoding=encoding, delivery_mode=PERSISTENT,
                                         declare=[], retry=False, **job.properties)
                    if sent_events:
                        publish_sent_events(dispatcher, producer, [job.event for job in jobs])
                if on_batch is not None:
                    on_batch(len(part))
    except (KombuError, OSError, redis.RedisError) as err:
        # KombuError covers OperationalError and BatchPublishError (a batch the broker
        # refused part of: its delivery is uncertain, so the run is cancelled).
        cause = err.__cause__ if isinstance(err, BatchPublishError) and err.__cause__ else err
        message = f"broker {redact(app.conf.broker_url)} failed while publishing: {cause}"
        raise BrokerUnreachableError(message) from None


EncodedBatch = tuple[Sequence[JobSpec], list["Outgoing"], Iterable[tuple[str, str, Any]]]


def encoded_batches(amqp: Any, specs: Sequence[JobSpec], task_ids: Sequence[str],
                    sent_events: bool, serializer: str,
                    pool: ThreadPoolExecutor) -> Iterator[EncodedBatch]:
    """Each batch's jobs, their messages and their encoded bodies, one batch ahead: a
    signed batch is signed in ``pool`` while the batch before it is published (signing is
    most of a signed job's cost, and RSA lets go of the GIL meanwhile)."""
    encode = partial(dumps, serializer=serializer)
    ahead: EncodedBatch | None = None
    for part, ids in zip(chunks(specs), chunks(task_ids), strict=True):
        jobs = [outgoing(amqp, spec, task_id, sent_events)
                for spec, task_id in zip(part, ids, strict=True)]
        bodies = [job.body for job in jobs]
        # Executor.map submits the whole batch at once; plain map encodes as it publishes.
        encoded = (pool.map(encode, bodies) if serializer == AUTH_SERIALIZER
                   else map(encode, bodies))
        if ahead is not None:
            yield ahead
        ahead = (part, jobs, encoded)
    if ahead is not None:
        yield ahead


def shown_name(spec: JobSpec) -> str:
    """The task's name in Flower and the worker's log (Celery's ``shadow``): which job it is.
    Only shown; the worker runs the task the message names, ``RUN_JOB_TASK``."""
    where = "floating" if spec.floating else f"on {spec.slot}"
    return f"job {spec.job_id} {where} (run {spec.run_id})"


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """One job's Celery message before its body is encoded, and its task-sent event."""

    queue: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: Any
    event: dict[str, Any] | None


def outgoing(amqp: Any, spec: JobSpec, task_id: str, sent_event: bool) -> Outgoing:
    """The job's message as Celery builds it (``as_task_v2``); the body carries the task id,
    which a signature then covers (the headers are not signed)."""
    message = {**spec.to_message(), "task_id": task_id}
    queue = spec.queue
    # Flower's view of the arguments: one readable line, made cheaply (Celery's saferepr
    # of a job's message costs more than the rest of publishing it, and a full copy of the
    # message would double what each queued job weighs in Redis).
    shown = f"{spec.job_id}: {spec.script} {shlex.join(spec.args)}"[:ARGSREPR_CHARS]
    name = shown_name(spec)
    headers, properties, body, event = amqp.as_task_v2(
        task_id, RUN_JOB_TASK, args=[message], argsrepr=shown, kwargsrepr="{}",
        create_sent_event=sent_event, shadow=name)
    if event is not None:
        event.update(queue=queue, exchange="", routing_key=queue, name=name)
    return Outgoing(queue, headers, properties, body, event)


def publish_sent_events(dispatcher: Any, producer: Any,
                        fields: Sequence[dict[str, Any] | None]) -> None:
    """The ``task-sent`` events of a batch as one event message: a list of events under
    the routing key ``task.multi``, the form Celery's own worker uses when it buffers its
    task events, and which every event receiver (Flower's included) reads event by event.
    One message instead of one per job: a third of a 10,000-job submit otherwise."""
    from celery.events.event import Event
    from celery.utils.time import utcoffset

    offset = utcoffset()
    events = [Event("task-sent", hostname=dispatcher.hostname, utcoffset=offset,
                    pid=dispatcher.pid, clock=dispatcher.clock.forward(), **event)
              for event in fields if event is not None]
    if events:
        producer.publish(events, routing_key="task.multi", exchange=dispatcher.exchange.name,
                         declare=[dispatcher.exchange], serializer=dispatcher.serializer,
                         headers=dispatcher.headers, delivery_mode=dispatcher.delivery_mode,
                         retry=False)


def publish_run(
    plan: Plan,
    client: redis.Redis,
    app: Celery,
    before_publish: Callable[[Plan], list[str]] | None = None,
    extra: dict[str, Any] | None = None,
    done: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Record and publish a prepared run; the broker must have answered ``check_broker``.

    ``before_publish`` runs once the input is known good and Redis is up, before
    anything is recorded (pushing input files to nodes, say); the lines it returns are
    kept with the run (``pushed``); if it raises, nothing was published. ``extra`` goes
    into the run's metadata; jobs in ``done`` are recorded skipped and not published.
    """
    # Only now, with the input valid and Redis up, are legacy chunk files written.
    write_chunks(plan.conversions, plan.options.workdir)
    pushed = before_publish(plan) if before_publish is not None else []
    record_run(client, plan, {**(extra or {}), "pushed": pushed}, done)
    pending = [spec for spec in plan.specs if spec.job_id not in done]
    task_ids = [task_id_for(spec) for spec in pending]
    held = held_jobs(plan, done)
    tracker = JobTracker(client)
    sent = 0  # jobs of ``pending`` in batches the broker took
    notes: list[str] = []

    def took(count: int) -> None:
        nonlocal sent
        sent += count

    deadline = time.monotonic() + FAILOVER_WAIT_S
    while True:
        try:
            publish(pending[sent:], app, task_ids[sent:], on_batch=took, held=held)
            break
        except BrokerUnreachableError as err:
            if not new_master_within(app.conf.broker_url, deadline):
                # Workers drop messages of a cancelled run: the half that got out is harmless.
                with contextlib.suppress(redis.RedisError):
                    tracker.set_run_state(plan.run_id, RunState.CANCELLED)
                raise
            # The batch that failed may or may not be queued: its jobs are not sent again
            # here (a copy could run twice); ``wait`` finds those whose message is gone and
            # publishes them again, once, under a new task id.
            uncertain = len(pending[sent:sent + BATCH_SIZE])
            note = (f"the broker failed over while publishing ({err}): {sent} jobs published "
                    f"before, {uncertain} in the batch it lost (coordinator wait publishes "
                    f"any whose message is gone), the rest after")
            sent += uncertain
            if not client.exists(run_key(plan.run_id)):  # not yet on the promoted replica
                record_run(client, plan, {**(extra or {}), "pushed": pushed}, done)
            notes.append(note)
            client.hset(run_key(plan.run_id), "publish_notes", json.dumps(notes))
    tracker.set_run_state(plan.run_id, RunState.ACTIVE)


def new_master_within(url: str, deadline: float) -> bool:
    """For a broker behind Sentinels: wait until a master answers (a failover), up to
    ``deadline``. A single Redis is not waited for: its loss ends the publishing."""
    from worker_tasks.connections import is_sentinel, redis_client

    if not is_sentinel(url):
        return False
    client = redis_client(url, socket_connect_timeout=1, socket_timeout=2)
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if client.info("replication").get("role") == "master":
                return True
        time.sleep(0.2)
    return False


def cancel_run(client: redis.Redis, run_id: str) -> int:
    """Mark the run cancelled and every job not yet final with it; returns how many.

    Queued jobs are dropped by the worker that takes their message; running ones are
    killed (with everything they started) by their worker within a second, and
    never get a ``.done``. Each job changes state atomically, so the count is exact.
    """
    tracker = JobTracker(client)
    counts = tracker.counts(run_id)
    if not any(counts.get(state, 0) for state in CANCELLABLE):
        return 0  # every job is final already: the run's outcome is what its jobs did
    job_ids = [raw.decode() for raw in client.lrange(jobs_key(run_id), 0, -1)]
    tracker.set_run_state(run_id, RunState.CANCELLED)
    cancelled = 0
    for part in chunks(job_ids):
        pipe = client.pipeline(transaction=False)
        for job_id in part:
            tracker.cancel(run_id, job_id, client=pipe)
        cancelled += sum(1 for result in pipe.execute() if result[0] in (b"ok", "ok"))
    return cancelled


def republish(client: redis.Redis, app: Celery, run_id: str, job_ids: Sequence[str],
              allowed: Sequence[JobState], changes: Callable[[dict[str, Any]], dict[str, Any]]
              | None = None, note: str | None = None) -> list[str]:
    """Queue jobs again under a new task id each (the old messages become stale).

    ``allowed``: ``RETRYABLE``, ``MOVABLE`` or ``LOST_ONLY`` (``worker_tasks.tracking``).
    ``changes`` may alter a record's fields (a new node, say) before its message is
    rebuilt. Only jobs in one of ``allowed`` states move; returns those job ids.
    """
    tracker = JobTracker(client)
    moved: list[tuple[JobSpec, str]] = []
    for job_id in job_ids:
        record = tracker.record(run_id, job_id)
        if not record or JobState(record["state"]) not in allowed:
            continue
        update = changes(record) if changes else {}
        # A floating job floats again (retry, republish): its record names where it last ran;
        # unless this republish places it (the tail of a followed run).
        if record.get("floating") and "node" not in update:
            update = {**update, "node": FLOATING_NODE}
        spec = spec_from_record(run_id, {**record, **update, "job_id": job_id})
        task_id = task_id_for(spec, next_generation(record))
        result = tracker.republish(run_id, job_id, allowed, record.get("task_id"), task_id,
                                   spec.node, record.get("attempts", 0), note, update)
        if result.ok:
            moved.append((spec, task_id))
    if not moved:
        return []
    tracker.set_run_state(run_id, RunState.ACTIVE)
    # A job whose dependencies have not all succeeded (retried with them) waits again.
    waiting = {spec.job_id for spec, _ in moved if spec.after and not all(
        JobState(tracker.record(run_id, name, "state").get("state", JobState.QUEUED)).is_success
        for name in spec.after)}
    held = {job_id for job_id in waiting if tracker.hold(
        run_id, job_id, next(spec.queue for spec, _ in moved if spec.job_id == job_id)).ok}
    publish([spec for spec, _ in moved], app, [task_id for _, task_id in moved], held=held)
    if held:
        dependencies = Dependencies(client, redis_client(app.conf.broker_url))
        for job_id in held:  # a dependency may have succeeded meanwhile
            dependencies.release_if_ready(run_id, job_id)
    return [spec.job_id for spec, _ in moved]


def publish_copy(client: redis.Redis, app: Celery, run_id: str, job_id: str,
                 slot: str) -> str | None:
    """A backup copy of running job ``job_id`` on ``slot``: recorded (once per job, while it
    runs under the message it ran under when read), then published, signed as every job.
    Returns the copy's task id, or None when the record refused it."""
    tracker = JobTracker(client)
    record = tracker.record(run_id, job_id)
    if not record or record.get("state") != JobState.RUNNING or record.get("copy"):
        return None
    spec = dataclasses.replace(spec_from_record(run_id, {**record, "node": slot,
                                                         "job_id": job_id}), copy=True)
    task_id = task_id_for(spec, next_generation(record))
    if not tracker.add_copy(run_id, job_id, record["task_id"], task_id, slot).ok:
        return None
    publish([spec], app, [task_id])
    return task_id
