"""The run handle: what other pipeline steps hold after ``submit``.

    run = submit("scoring_jobs.json")
    run.status()            # a RunStatus snapshot, from Redis
    run.wait(timeout=600)   # blocks until every job is final
    run.summary()           # collects: writes run_summary.json, returns it

Submitting is two steps that can be taken apart: ``prepare(jobs, options)``
validates and plans (nothing is written; ``--dry-run`` prints the plan), and
``publish(plan)`` records and sends that plan as it is. The handle sits on top
of publishing (``coordinator.submission``), reading records
(``coordinator.records``) and collecting (``coordinator.collector``); none of
those imports it. Everything the handle knows it reads from Redis, so a handle
from ``get_run`` knows what the one ``submit`` returned knows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from celeryconfig import task_default_queue as UNASSIGNED_QUEUE
from coordinator.broker import (
    CONNECT_TIMEOUT_S,
    check_broker,
    connect_tracking,
    publisher,
    redact,
)
from coordinator.broker import broker_url as resolve_broker_url
from coordinator.errors import InvalidJobsError, RunNotFoundError
from coordinator.records import (
    FOLLOW_FIELDS,
    RunInfo,
    RunStatus,
    latest_run_id,
    read_info,
    read_status,
    recent_run_ids,
    unfinished_run_of,
)
from worker_tasks.connections import redis_client
from worker_tasks.dependencies import Dependencies, run_outcome, waiters_key
from worker_tasks.spec import gpu_of_slot, is_floating, is_safe_name, node_of_slot, slot_of_worker
from worker_tasks.tracking import LOST_ONLY, RETRYABLE, RUN_TTL_S, runs_key

if TYPE_CHECKING:  # imported where used: a run's status and records need none of them
    from celery import Celery

    from coordinator.cluster.inventory import Inventory
    from coordinator.collector import Collection
    from coordinator.options import SubmitOptions
    from coordinator.plan import Plan
    from coordinator.scheduler import Scheduler, SchedulerOptions
    from coordinator.submission import JobsInput
    from worker_tasks.speeds import SlotSpeed

logger = logging.getLogger("coordinator")

InventoryInput = "Inventory | str | Path | None"


@dataclass(frozen=True)
class Gap:
    """A slot of a run that no worker serves (``Service.gaps``).

    Parameters:
        slot: the slot (``rig-a``, ``rig-a.gpu1``, or the floating queue's).
        node, gpu: the node it belongs to, and its GPU in per-GPU mode (else None).
        floating: its jobs float: any worker at all would take them.
        jobs: how many of the run's jobs were planned there.
        other_kind: the node's slots served by workers of the other kind (per-GPU workers
            for a whole-node slot, or the reverse), which never take these jobs.
    """

    slot: str
    node: str
    gpu: int | None
    floating: bool
    jobs: int
    other_kind: list[str]


@dataclass(frozen=True)
class Service:
    """Who serves a run right now (``Run.service``).

    Parameters:
        workers: node -> the workers serving it (or its GPUs).
        unserved: slot -> jobs planned there, for the slots no worker serves (a per-GPU
            worker takes no whole-node job, nor the other way round).
        unassigned: messages in the broker's default queue, which no worker consumes.
        refusing: workers that will refuse this run's jobs: it was published unsigned and
            they run only signed jobs (they hold a trust store).
    """

    workers: dict[str, list[str]]
    unserved: dict[str, int]
    unassigned: int
    refusing: list[str]

    def gaps(self) -> list[Gap]:
        """The unserved slots, each with what would serve it."""
        gaps = []
        for slot, count in self.unserved.items():
            node, gpu = node_of_slot(slot), gpu_of_slot(slot)
            other_kind = sorted(slot_of_worker(name) for name in self.workers.get(node, [])
                                if (gpu_of_slot(slot_of_worker(name)) is None) != (gpu is None))
            gaps.append(Gap(slot, node, gpu, is_floating(node), count, other_kind))
        return gaps


class Run:
    """A handle on a submitted run; every method reads Redis, so any process may hold one.

    Parameters:
        run_id: the id printed by ``submit``.
        client: a redis-py client on the tracking Redis.
        broker_url: the broker, for retrying or cancelling jobs.
        inventory: the cluster inventory; nodes without shared storage have their
            outputs fetched over SSH when the run is collected.
    """

    def __init__(self, run_id: str, client: redis.Redis, broker_url: str | None = None,
                 inventory: Inventory | None = None) -> None:
        self.id = run_id
        self.client = client
        self.broker_url = broker_url
        self.inventory = inventory
        self._app: Celery | None = None
        self._broker: redis.Redis | None = None
        # True when ``submit(resume=True)`` found this run under way and published nothing.
        self.resumed = False

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    def info(self) -> RunInfo:
        """The run's metadata as recorded at submit time: one read of its hash."""
        return RunInfo(read_info(self.client, self.id))

    def status(self, fields: list[str] | None = None, light: bool = False) -> RunStatus:
        """A snapshot of every job's record (``fields``: only these; all by default).

        ``light``: only what following needs (states, attempts, hosts, errors; not the
        jobs' messages), which reads a 100,000-job run in a second or two.
        """
        if light:
            fields = FOLLOW_FIELDS
        return read_status(self.client, self.id, *([fields] if fields else []))

    def service(self, info: RunInfo | None = None) -> Service:
        """Who serves this run's slots right now: the presence registry (one read whatever the
        cluster's width; a worker killed outright stays listed for up to ``PRESENCE_TTL_S``),
        and the broker's queue of messages no worker consumes. ``info``: the run's metadata,
        when the caller has read it already."""
        from coordinator.cluster_view import ClusterView
        from worker_tasks.presence import verifying

        info = info or self.info()
        per_slot = info.jobs_per_slot
        served = ClusterView(self.client).serving(
            {*info.planned, *(node_of_slot(slot) for slot in per_slot)})
        serving_slots = {slot_of_worker(name) for names in served.values() for name in names}

        def is_served(slot: str) -> bool:
            node = node_of_slot(slot)  # floating jobs: any worker at all takes them
            return node in served and (is_floating(node) or slot in serving_slots)

        everyone = [name for names in served.values() for name in names]
        return Service(
            workers=served,
            unserved={slot: count for slot, count in sorted(per_slot.items())
                      if not is_served(slot)},
            unassigned=int(self.broker.llen(UNASSIGNED_QUEUE)),
            refusing=[] if info.signed else verifying(self.client, everyone))

    def speeds(self, info: RunInfo | None = None) -> dict[str, dict[str, SlotSpeed]]:
        """script -> slot -> how fast the slot runs it, for this run's scripts (learned from
        every run's attempts: ``worker_tasks.speeds``)."""
        from coordinator.cluster_view import ClusterView

        return ClusterView(self.client).speeds((info or self.info()).get("scripts", []))

    def workers(self, nodes: Iterable[str]) -> dict[str, list[str]]:
        """node -> the workers serving it (or its GPUs), for ``nodes``: presence, one read."""
        from coordinator.cluster_view import ClusterView

        return ClusterView(self.client).serving(nodes)

    def wait(
        self,
        timeout: float | None = None,
        on_progress: Callable[[RunStatus], None] | None = None,
        poll_interval: float | None = None,
        failover: float | None = None,
        workdir: str | Path | None = None,
        notice: Callable[[str], None] | None = None,
        no_worker_timeout: float | None = None,
    ) -> RunStatus:
        """Block until every job is final; ``on_progress`` gets each changed snapshot.

        Reads only what changed (the run's change stream), reconnects when Redis goes
        away (``SC_RECONNECT_TIMEOUT``), settles records that disagree with ``.done``
        files in ``workdir`` or with dead workers, publishes lost jobs again (once), and with
        ``failover`` moves the queued jobs of a node without a worker for that many
        seconds. ``notice`` gets one line per such event (default: logged).
        Raises ``WaitTimeoutError`` when ``timeout`` seconds pass first,
        ``RunVanishedError`` if the run's records disappear, ``NoWorkerError`` once no
        worker has served any of its waiting jobs, nothing running, for
        ``no_worker_timeout`` seconds (None: wait for workers for ever).
        """
        from coordinator.follow import POLL_INTERVAL_S, FollowOptions, follow
        from coordinator.scheduler import SchedulerOptions

        notice = notice or logger.warning
        following = FollowOptions(timeout=timeout,
                                  poll_interval=POLL_INTERVAL_S if poll_interval is None
                                  else poll_interval, notice=notice,
                                  no_worker_timeout=no_worker_timeout)
        scheduler = self.scheduler(SchedulerOptions(
            workdir=None if workdir is None else Path(workdir), failover=failover,
            notice=notice))
        return follow(self.client, self.id, on_progress, following, scheduler)

    def scheduler(self, options: SchedulerOptions) -> Scheduler:
        """The head's decisions about this run (``coordinator.scheduler``)."""
        from coordinator.scheduler import Scheduler

        return Scheduler(self.client, self.app, self.broker, self.id, options)

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = publisher(self.broker_url)
        return self._app

    @property
    def broker(self) -> redis.Redis:
        """A client on the broker's Redis (its queues), for finding lost messages."""
        if self._broker is None:
            self._broker = redis_client(resolve_broker_url(self.broker_url),
                                        socket_connect_timeout=CONNECT_TIMEOUT_S,
                                        socket_timeout=CONNECT_TIMEOUT_S * 10)
        return self._broker

    def settle(self, workdir: str | Path | None = None) -> list[str]:
        """Settle this run's records once (see ``wait``); returns what changed, one line each."""
        from coordinator.scheduler import SchedulerOptions

        lines: list[str] = []
        options = SchedulerOptions(workdir=None if workdir is None else Path(workdir),
                                   notice=lines.append, republish_lost=False)
        light = read_status(self.client, self.id, FOLLOW_FIELDS)
        self.scheduler(options).settle(light)
        return lines

    def accounting(self) -> list[dict[str, Any]]:
        """Every attempt of every job, in jobs-file order (``coordinator acct``): where and
        when it ran, how long, its tree's CPU seconds and largest RSS, how it ended. A field
        not known (an attempt that died with its worker, one from before 2026-12-06) is
        None."""
        rows = []
        for job in self.status().jobs:
            for entry in job.history:
                rows.append({
                    "job_id": job.job_id, "attempt": entry.get("attempt"),
                    "node": entry.get("node") or job.node,
                    "gpu": entry.get("gpu", job.gpu_id), "host": entry.get("host"),
                    "started_at": entry.get("started_at"),
                    "finished_at": entry.get("finished_at"),
                    "elapsed_s": entry.get("elapsed_s", elapsed(entry)),
                    "cpu_s": entry.get("cpu_s"), "max_rss_mb": entry.get("max_rss_mb"),
                    "gpu_mem_mb": entry.get("gpu_mem_mb"),
                    "exit_code": entry.get("exit_code"), "signal": entry.get("signal"),
                    "error": entry.get("error"),
                    # A backup copy's attempt says "copy"; one another execution beat says so.
                    "superseded": bool(entry.get("superseded"))})
        return rows

    def log(self, job_id: str, attempt: int | None = None,
            workdir: str | Path | None = None) -> tuple[str, str]:
        """The job's log as it is now (``attempt``: that attempt's part only), read where it
        was written: here, or on its node over SFTP (``coordinator log``); and where that is
        (a path, or ``node:path``)."""
        from coordinator.job_log import attempt_section, job_record, open_log

        status = self.status()
        job = job_record(status, job_id)
        log = open_log(job, Path(workdir) if workdir else status.files_dir(),
                       self.inventory, attempt)
        try:
            text = log.read(0).decode("utf-8", errors="replace")
        finally:
            log.close()
        return (attempt_section(text, attempt) if attempt is not None else text), log.where

    def follow_log(self, job_id: str, workdir: str | Path | None = None) -> Iterator[bytes]:
        """The job's log as it grows, until the job is final (``coordinator log --follow``)."""
        from coordinator.job_log import follow, job_record, open_log

        status = self.status()
        log = open_log(job_record(status, job_id),
                       Path(workdir) if workdir else status.files_dir(), self.inventory)

        def finished() -> bool:
            return job_record(self.status(), job_id).state.is_final

        try:
            yield from follow(log, finished)
        finally:
            log.close()

    def timeline_input(self, workdir: str | Path | None = None) -> tuple[dict[str, Any], Path]:
        """What ``report`` draws: the run's summary as ``collect`` would write it (nothing is
        written, nothing merged), and the run's output directory under ``workdir`` (default:
        where it was submitted)."""
        from coordinator.collector import build_summary

        status = self.status()
        base = Path(workdir) if workdir else status.files_dir()
        return build_summary(status, status.jobs), base / status.output_dir

    def collect(self, workdir: str | Path | None = None, fetch: bool | None = None,
                joblog: str | Path | None = None) -> Collection:
        """Settle every job by its ``.done`` file, merge outputs, write ``run_summary.json``.

        ``workdir``: where the ``.done`` files and the output directory are (default: the
        directory the run's workers wrote into, when this machine sees it, else the one the
        run was submitted with). A job its worker recorded as succeeded whose marker is not
        there is ``unconfirmed`` (``Collection.exit_code`` 7), not failed.

        ``fetch``: bring outputs home from nodes without shared storage first
        (default: whenever the run's inventory has such nodes). ``joblog``: where the
        GNU-parallel-format job log goes (default: beside the summary).
        """
        from coordinator.collector import collect

        inventory = self.inventory if fetch is not False else None
        if fetch and inventory is None:
            raise InvalidJobsError("--fetch needs a cluster inventory (--inventory FILE)")
        return collect(self.status(), workdir=workdir, inventory=inventory, joblog=joblog)

    def summary(self, workdir: str | Path | None = None) -> dict[str, Any]:
        """Collect the run (see ``collect``) and return the summary as a dict."""
        return self.collect(workdir).summary

    def cancel(self) -> int:
        """Stop the run: queued jobs are dropped, running ones killed. Returns how many.

        A job cancelled while running never gets a ``.done``, even if its script was
        finishing at that moment.
        """
        from coordinator.submission import cancel_run

        cancelled = cancel_run(self.client, self.id)
        # Held jobs (and runs waiting for this one) learn it here: no worker may see its end.
        Dependencies(self.client, self.broker).after_run_end(self.id)
        return cancelled

    def retry_failed(self, lost: bool = False) -> int:
        """Publish the failed and cancelled jobs again (``lost``: the lost ones only).

        Returns how many. Each gets a new task id; its old message, if it ever
        arrives, is dropped.
        """
        from coordinator.submission import republish

        check_broker(self.app)
        states = LOST_ONLY if lost else RETRYABLE
        job_ids = [job.job_id for job in self.status().jobs if job.state in states]
        return len(republish(self.client, self.app, self.id, job_ids, states,
                             note="published again"))

    def move(self, source: str, targets: list[str]) -> dict[str, list[str]]:
        """Move the queued jobs of node ``source`` to the least loaded of ``targets``;
        pinned jobs stay.

        Jobs of ``source`` that were running when its worker died move too. Returns
        target -> job ids moved there.
        """
        from coordinator.cluster_view import ClusterView
        from coordinator.scheduler import move_off

        for name in [source, *targets]:
            if not is_safe_name(name):
                raise InvalidJobsError(f"{name!r} is not a node name")
        if source in targets:
            raise InvalidJobsError(f"the targets list {source}, the node the jobs move from")
        check_broker(self.app)
        live = ClusterView(self.client, self.app).liveness({source})
        return move_off(self.client, self.app, self.broker, self.id, source, targets, live)


def load_inventory_input(inventory: InventoryInput) -> Inventory | None:
    """An ``Inventory`` as given, or loaded from the path given (None: none)."""
    if inventory is None or not isinstance(inventory, str | Path):
        return inventory
    from coordinator.cluster.inventory import find_inventory

    return find_inventory(inventory)


def options_of(options: SubmitOptions | None, settings: dict[str, Any]) -> SubmitOptions:
    """``options`` (default: the defaults) with keyword ``settings`` applied on top."""
    from coordinator.options import SubmitOptions

    if "inventory" in settings:
        settings = {**settings, "inventory": load_inventory_input(settings["inventory"])}
    if "after" in settings:  # after=run, after=[run, "20261206-..."]: the runs it waits for
        after = settings.pop("after")
        settings["after_runs"] = tuple(
            item.id if isinstance(item, Run) else str(item)
            for item in ([after] if isinstance(after, str | Run) else after or ()))
    return (options or SubmitOptions()).but(**settings)


def submit(jobs: JobsInput, options: SubmitOptions | None = None, *,
           broker_url: str | None = None, tracking_url: str | None = None,
           resume: bool = False, recover: bool = False, **settings: Any) -> Run:
    """Validate, record and publish a run; returns its handle.

    ``jobs`` is a jobs file path or a list of job dicts (the jobs-file format).
    ``options`` (a ``SubmitOptions``), or any of its fields as keywords
    (``output_dir=``, ``workdir=``, ``retries=``, ``per_gpu=``, ``inventory=`` an
    ``Inventory`` or its path, ...): see ``SubmitOptions``. ``after=`` a run (or run
    id), or a list of them: the run is held until each has succeeded (``after_any=True``:
    until each has ended).
    ``resume``: when a run of the same jobs, options and workdir is still under way (its
    submitter died, say), return its handle (``run.resumed``) instead of publishing it again.
    ``recover``: see ``recover``.
    Raises ``InvalidJobsError`` (nothing published), ``BrokerUnreachableError``,
    or ``NodeFailedError`` (an input could not be pushed; nothing published).
    """
    return publish(prepare(jobs, options, **settings), broker_url=broker_url,
                   tracking_url=tracking_url, recover=recover, resume=resume)


def recover(jobs: JobsInput, options: SubmitOptions | None = None, *,
            broker_url: str | None = None, tracking_url: str | None = None,
            **settings: Any) -> Run:
    """A run re-created from its jobs file and the ``.done`` files on disk.

    For when Redis lost a run's records: jobs whose ``.done`` exists (here, or on
    their node when it keeps its outputs on its own disk) are recorded as skipped;
    only the others are published. Arguments as for ``submit``.
    """
    return submit(jobs, options, broker_url=broker_url, tracking_url=tracking_url,
                  recover=True, **settings)


def prepare(jobs: JobsInput, options: SubmitOptions | None = None, **settings: Any) -> Plan:
    """Validate and plan a run without touching Redis (what ``--dry-run`` prints).

    Arguments as for ``submit``; ``publish(plan)`` then records and sends it as it is.
    """
    from coordinator.submission import prepare as prepare_plan

    return prepare_plan(jobs, options_of(options, settings))


def publish(plan: Plan, broker_url: str | None = None, tracking_url: str | None = None,
            recover: bool = False, resume: bool = False,
            notice: Callable[[str], None] | None = None) -> Run:
    """Record and publish a prepared plan as it is; returns the run's handle.

    ``recover``: jobs whose ``.done`` exists already are recorded skipped, not published.
    ``resume``: an unfinished run of the same plan is returned instead (see ``submit``).
    ``notice``: where a line goes before the first run is published to a Redis that holds no
    record and no worker of ours (it may be another program's; default: logged).
    """
    from coordinator.submission import publish_run

    url = resolve_broker_url(broker_url)
    cluster = plan.options.inventory
    client = connect_tracking(tracking_url, url)
    if resume:
        under_way = unfinished_run_of(client, plan.digest(),
                                      str(plan.options.workdir.resolve()))
        if under_way is not None:
            run = Run(under_way, client, url, inventory=cluster)
            run.resumed = True
            return run
    app = publisher(url)
    check_broker(app)
    if not holds_ours(client):
        (notice or logger.warning)(
            f"{redact(url)} holds no run and no worker of scripts-coordinator: publishing the "
            f"first run there (name another broker with --broker URL or $SC_BROKER_URL)")
    check_awaited(client, plan.options)
    done = done_jobs(plan, plan.options.workdir, cluster) if recover else set()
    before = None
    if cluster is not None and cluster.any_node_local_storage:
        from coordinator.cluster.outputs import push_inputs

        def before(plan_: Plan) -> list[str]:
            return [outcome.line() for outcome in push_inputs(cluster, plan_,
                                                               plan_.options.workdir)]

    for awaited in plan.options.after_runs:  # listed first: no end of theirs goes unseen
        client.sadd(waiters_key(awaited), plan.run_id)
        client.expire(waiters_key(awaited), RUN_TTL_S)
    publish_run(plan, client, app, before_publish=before,
                extra={"recovered": recover, "signed": bool(app.conf.get("sc_sign_jobs"))},
                done=done)
    run = Run(plan.run_id, client, url, inventory=cluster)
    if plan.options.after_runs:  # they may have ended meanwhile
        Dependencies(client, run.broker).settle_run(plan.run_id)
    return run


def elapsed(entry: dict[str, Any]) -> float | None:
    """An attempt's elapsed seconds from its start and end, when both are known."""
    if entry.get("started_at") is None or entry.get("finished_at") is None:
        return None
    return round(entry["finished_at"] - entry["started_at"], 3)


def check_awaited(client: redis.Redis, options: SubmitOptions) -> None:
    """The runs a held run waits for are recorded, and can still come to what it waits for
    (``InvalidJobsError`` otherwise: nothing is published)."""
    if options.after_any and not options.after_runs:
        raise InvalidJobsError("--after-any: give the runs to wait for with --after RUN")
    for awaited in options.after_runs:
        outcome = run_outcome(client, awaited)
        if outcome is None:
            raise RunNotFoundError(f"--after {awaited}: no such run in this Redis (expired, or "
                                   f"a wrong id)")
        if not options.after_any and outcome in ("failed", "cancelled"):
            raise InvalidJobsError(f"--after {awaited}: that run {outcome}, so this one would "
                                   f"never start (--after-any waits for it to end, however)")


def holds_ours(client: redis.Redis) -> bool:
    """The tracking Redis holds a run of ours, or a worker of ours announced itself there
    lately: two keys looked at, never a scan of what may be another program's Redis."""
    from worker_tasks.presence import seen_key

    return bool(client.exists(runs_key(), seen_key()))


def done_jobs(plan: Plan, workdir: Path, cluster: Inventory | None) -> set[str]:
    """The jobs whose ``.done`` exists: here, or on the node that keeps its own outputs."""
    done = {spec.job_id for spec in plan.specs if (workdir / spec.done_file).exists()}
    if cluster is not None and cluster.any_node_local_storage:
        from coordinator.cluster.outputs import markers_on_nodes

        done |= markers_on_nodes(cluster, [spec for spec in plan.specs
                                           if spec.job_id not in done])
    return done


def latest_run(broker_url: str | None = None, tracking_url: str | None = None,
               inventory: InventoryInput = None) -> Run:
    """A handle on the newest run recorded (``RunNotFoundError`` if there is none)."""
    url = resolve_broker_url(broker_url)
    newest = latest_run_id(connect_tracking(tracking_url, url))
    if newest is None:
        raise RunNotFoundError("no runs recorded in this Redis yet")
    return get_run(newest, url, tracking_url, inventory)


def recent_runs(limit: int, broker_url: str | None = None,
                tracking_url: str | None = None) -> list[Run]:
    """Handles on the newest ``limit`` runs, newest first (expired ones left out)."""
    url = resolve_broker_url(broker_url)
    client = connect_tracking(tracking_url, url)
    return [Run(run_id, client, url) for run_id in recent_run_ids(client, limit)]


def get_run(run_id: str, broker_url: str | None = None, tracking_url: str | None = None,
            inventory: InventoryInput = None) -> Run:
    """A handle on an existing run (raises ``RunNotFoundError`` if unknown)."""
    url = resolve_broker_url(broker_url)
    run = Run(run_id, connect_tracking(tracking_url, url), url,
              inventory=load_inventory_input(inventory))
    run.info()
    return run
