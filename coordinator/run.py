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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

import celeryconfig
from coordinator.broker import CONNECT_TIMEOUT_S, check_broker, connect_tracking, publisher
from coordinator.broker import broker_url as resolve_broker_url
from coordinator.errors import InvalidJobsError, RunNotFoundError
from coordinator.records import (
    FOLLOW_FIELDS,
    RunStatus,
    latest_run_id,
    read_info,
    read_status,
    recent_run_ids,
    unfinished_run_of,
)
from worker_tasks.connections import redis_client
from worker_tasks.spec import is_floating, node_of_slot, slot_of_worker
from worker_tasks.tracking import LOST_ONLY, RETRYABLE

if TYPE_CHECKING:  # imported where used: a run's status and records need none of them
    from celery import Celery

    from coordinator.cluster.inventory import Inventory
    from coordinator.collector import Collection
    from coordinator.options import SubmitOptions
    from coordinator.plan import Plan
    from coordinator.scheduler import Scheduler, SchedulerOptions
    from coordinator.submission import JobsInput

logger = logging.getLogger("coordinator")

InventoryInput = "Inventory | str | Path | None"


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

    def info(self) -> dict[str, Any]:
        """The run's metadata as recorded at submit time."""
        return read_info(self.client, self.id)

    @property
    def pushed(self) -> list[str]:
        """Lines about input files pushed to nodes before publishing (node-local storage)."""
        return list(self.info().get("pushed") or [])

    @property
    def signed(self) -> bool:
        """Whether its jobs were published signed with the head's key."""
        return bool(self.info().get("signed"))

    @property
    def publish_notes(self) -> list[str]:
        """What happened while publishing that a user should know (a broker failover)."""
        return list(self.info().get("publish_notes") or [])

    @property
    def recovered(self) -> int:
        """Jobs a recovered run found done (their ``.done`` exists) and did not publish."""
        return int(self.info().get("recovered_jobs") or 0)

    @property
    def planned(self) -> dict[str, int]:
        """Jobs per node, as submitted."""
        return dict(self.info().get("jobs_per_node") or {})

    @property
    def slots(self) -> list[str]:
        """Where the run's jobs run one at a time: nodes, or nodes' GPUs (per-GPU runs)."""
        return list(self.info().get("slots") or [])

    def status(self, fields: list[str] | None = None, light: bool = False) -> RunStatus:
        """A snapshot of every job's record (``fields``: only these; all by default).

        ``light``: only what following needs (states, attempts, hosts, errors; not the
        jobs' messages), which reads a 100,000-job run in a second or two.
        """
        if light:
            fields = FOLLOW_FIELDS
        return read_status(self.client, self.id, *([fields] if fields else []))

    def workers(self, nodes: Iterable[str] | None = None) -> dict[str, list[str]]:
        """node -> the workers serving it (or its GPUs), for ``nodes`` (default: the run's):
        the presence registry, one Redis read whatever the cluster's width; a worker killed
        outright stays listed for up to ``PRESENCE_TTL_S`` (10 s)."""
        from coordinator.cluster_view import ClusterView

        return ClusterView(self.client).serving(self.planned if nodes is None else nodes)

    def unserved(self) -> dict[str, int]:
        """slot -> jobs planned there, for the run's slots (nodes, or nodes' GPUs in per-GPU
        runs) that no worker serves: a per-GPU worker takes no whole-node job, nor the other
        way round, though both count as serving the node."""
        from coordinator.cluster_view import ClusterView

        per_slot = dict(self.info().get("jobs_per_slot") or self.planned)
        served = ClusterView(self.client).serving({node_of_slot(slot) for slot in per_slot})
        serving_slots = {slot_of_worker(name) for names in served.values() for name in names}

        def is_served(slot: str) -> bool:
            node = node_of_slot(slot)  # floating jobs: any worker at all takes them
            return node in served and (is_floating(node) or slot in serving_slots)

        return {slot: count for slot, count in sorted(per_slot.items()) if not is_served(slot)}

    def refusing_workers(self) -> list[str]:
        """The workers serving this run's nodes that will refuse its jobs: it was published
        unsigned and they run only signed jobs (they hold a trust store). Empty for a
        signed run."""
        if self.info().get("signed"):
            return []
        from worker_tasks.presence import verifying

        return verifying(self.client, [name for names in self.workers().values()
                                       for name in names])

    def unassigned_messages(self) -> int:
        """Messages in the broker's default queue, which no worker consumes."""
        return int(self.broker.llen(celeryconfig.task_default_queue))

    def wait(
        self,
        timeout: float | None = None,
        on_progress: Callable[[RunStatus], None] | None = None,
        poll_interval: float | None = None,
        failover: float | None = None,
        workdir: str | Path | None = None,
        notice: Callable[[str], None] | None = None,
    ) -> RunStatus:
        """Block until every job is final; ``on_progress`` gets each changed snapshot.

        Reads only what changed (the run's change stream), reconnects when Redis goes
        away (``SC_RECONNECT_TIMEOUT``), settles records that disagree with ``.done``
        files in ``workdir`` or with dead workers, publishes lost jobs again (once), and with
        ``failover`` moves the queued jobs of a node without a worker for that many
        seconds. ``notice`` gets one line per such event (default: logged).
        Raises ``WaitTimeoutError`` when ``timeout`` seconds pass first,
        ``RunVanishedError`` if the run's records disappear.
        """
        from coordinator.follow import POLL_INTERVAL_S, FollowOptions, follow
        from coordinator.scheduler import SchedulerOptions

        notice = notice or logger.warning
        following = FollowOptions(timeout=timeout,
                                  poll_interval=POLL_INTERVAL_S if poll_interval is None
                                  else poll_interval, notice=notice)
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

        return cancel_run(self.client, self.id)

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
    return (options or SubmitOptions()).but(**settings)


def submit(jobs: JobsInput, options: SubmitOptions | None = None, *,
           broker_url: str | None = None, tracking_url: str | None = None,
           resume: bool = False, **settings: Any) -> Run:
    """Validate, record and publish a run; returns its handle.

    ``jobs`` is a jobs file path or a list of job dicts (the jobs-file format).
    ``options`` (a ``SubmitOptions``), or any of its fields as keywords
    (``output_dir=``, ``workdir=``, ``retries=``, ``per_gpu=``, ``inventory=`` an
    ``Inventory`` or its path, ...): see ``SubmitOptions``.
    ``resume``: when a run of the same jobs, options and workdir is still under way (its
    submitter died, say), return its handle (``run.resumed``) instead of publishing it again.
    Raises ``InvalidJobsError`` (nothing published), ``BrokerUnreachableError``,
    or ``NodeFailedError`` (an input could not be pushed; nothing published).
    """
    from coordinator.submission import prepare as prepare_plan

    plan = prepare_plan(jobs, options_of(options, settings))
    return publish(plan, broker_url=broker_url, tracking_url=tracking_url, resume=resume)


def recover(jobs: JobsInput, options: SubmitOptions | None = None, *,
            broker_url: str | None = None, tracking_url: str | None = None,
            **settings: Any) -> Run:
    """A run re-created from its jobs file and the ``.done`` files on disk.

    For when Redis lost a run's records: jobs whose ``.done`` exists (here, or on
    their node when it keeps its outputs on its own disk) are recorded as skipped;
    only the others are published. Arguments as for ``submit``.
    """
    from coordinator.submission import prepare as prepare_plan

    plan = prepare_plan(jobs, options_of(options, settings))
    return publish(plan, broker_url=broker_url, tracking_url=tracking_url, recover=True)


def publish(plan: Plan, broker_url: str | None = None, tracking_url: str | None = None,
            recover: bool = False, resume: bool = False) -> Run:
    """Record and publish a prepared plan as it is; returns the run's handle.

    ``recover``: jobs whose ``.done`` exists already are recorded skipped, not published.
    ``resume``: an unfinished run of the same plan is returned instead (see ``submit``).
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
    done = done_jobs(plan, plan.options.workdir, cluster) if recover else set()
    before = None
    if cluster is not None and cluster.any_node_local_storage:
        from coordinator.cluster.outputs import push_inputs

        def before(plan_: Plan) -> list[str]:
            return [outcome.line() for outcome in push_inputs(cluster, plan_,
                                                               plan_.options.workdir)]

    publish_run(plan, client, app, before_publish=before,
                extra={"recovered": recover, "signed": bool(app.conf.get("sc_sign_jobs"))},
                done=done)
    return Run(plan.run_id, client, url, inventory=cluster)


def prepare(jobs: JobsInput, options: SubmitOptions | None = None, **settings: Any) -> Plan:
    """Validate and plan a run without touching Redis (what ``--dry-run`` prints).

    Arguments as for ``submit``; ``publish(plan)`` then records and sends it as it is.
    """
    from coordinator.submission import prepare as prepare_plan

    return prepare_plan(jobs, options_of(options, settings))


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
