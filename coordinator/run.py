"""The run handle: what other pipeline steps hold after ``submit``.

    run = submit("scoring_jobs.json")
    run.status()            # a RunStatus snapshot, from Redis
    run.wait(timeout=600)   # blocks until every job is final
    run.summary()           # collects: writes run_summary.json, returns it

The handle sits on top of publishing (``coordinator.submit``), reading
records (``coordinator.records``) and collecting (``coordinator.collector``);
none of those imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from coordinator.broker import broker_url as resolve_broker_url
from coordinator.broker import check_broker, connect_tracking, publisher
from coordinator.cluster.inventory import Inventory, find_inventory
from coordinator.collector import Collection, collect
from coordinator.errors import InvalidJobsError, WaitTimeoutError
from coordinator.records import RunStatus, read_info, read_spec, read_status
from coordinator.submit import (
    DEFAULT_CHUNK_DIR,
    DEFAULT_OUTPUT_DIR,
    JobsInput,
    cancel_run,
    prepare,
    publish_run,
    retry_failed,
)

# How often wait() reads the run's state from Redis (seconds).
POLL_INTERVAL_S = 0.5

InventoryInput = Inventory | str | Path | None


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
        # Lines about input files pushed to nodes before publishing (node-local storage).
        self.pushed: list[str] = []

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    def info(self) -> dict[str, Any]:
        """The run's metadata as recorded at submit time."""
        return read_info(self.client, self.id)

    def status(self) -> RunStatus:
        """A snapshot of every job's state."""
        return read_status(self.client, self.id)

    def wait(
        self,
        timeout: float | None = None,
        on_progress: Callable[[RunStatus], None] | None = None,
        poll_interval: float = POLL_INTERVAL_S,
    ) -> RunStatus:
        """Block until every job is final; ``on_progress`` gets each changed snapshot.

        Raises ``WaitTimeoutError`` when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: list[tuple[str, str, int]] | None = None
        while True:
            status = self.status()
            shape = [(job.job_id, job.state.value, job.attempts) for job in status.jobs]
            if on_progress is not None and shape != last:
                on_progress(status)
            last = shape
            if status.finished:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(
                    f"run {self.id}: not finished after {timeout:g} s ({status.line()})"
                )
            time.sleep(poll_interval)

    def collect(self, workdir: str | Path = ".", fetch: bool | None = None) -> Collection:
        """Settle every job by its ``.done`` file, merge outputs, write ``run_summary.json``.

        ``fetch``: bring outputs home from nodes without shared storage first
        (default: whenever the run's inventory has such nodes).
        """
        inventory = self.inventory if fetch is not False else None
        if fetch and inventory is None:
            raise InvalidJobsError("--fetch needs a cluster inventory (--inventory FILE)")
        return collect(self.status(), workdir=workdir, inventory=inventory)

    def summary(self, workdir: str | Path = ".") -> dict[str, Any]:
        """Collect the run (see ``collect``) and return the summary as a dict."""
        return self.collect(workdir).summary

    def cancel(self) -> int:
        """Stop the run: queued jobs are dropped, running ones terminated. Returns how many."""
        return cancel_run(self.client, self.id, self.broker_url)

    def retry_failed(self) -> int:
        """Publish the failed and cancelled jobs again. Returns how many."""
        return retry_failed(self.client, self.id, self.broker_url)

    def spec_message(self, job_id: str) -> dict[str, Any]:
        """The message the job was published with (for retries)."""
        return read_spec(self.client, self.id, job_id)


def load_inventory_input(inventory: InventoryInput) -> Inventory | None:
    if inventory is None or isinstance(inventory, Inventory):
        return inventory
    return find_inventory(inventory)


def submit(
    jobs: JobsInput,
    output_dir: str = DEFAULT_OUTPUT_DIR,
    preserve_paths: bool = False,
    broker_url: str | None = None,
    tracking_url: str | None = None,
    chunk_dir: str = DEFAULT_CHUNK_DIR,
    workdir: str | Path = ".",
    inventory: InventoryInput = None,
) -> Run:
    """Validate, record and publish a run; returns its handle.

    ``jobs`` is a jobs file path or a list of job dicts (the jobs-file format).
    ``inventory`` (an ``Inventory`` or its path): node names are resolved through
    it (labels or hosts; a node it lacks is refused) and, for nodes without
    shared storage, Step 3 inputs are pushed to the node before publishing and
    outputs fetched when collecting.
    Raises ``InvalidJobsError`` (nothing published), ``BrokerUnreachableError``,
    or ``NodeFailedError`` (an input could not be pushed; nothing published).
    """
    url = resolve_broker_url(broker_url)
    cluster = load_inventory_input(inventory)
    plan, conversions = prepare(jobs, output_dir, preserve_paths, chunk_dir,
                                resolve_node=cluster.resolve if cluster else None)
    client = connect_tracking(tracking_url, url)
    app = publisher(url)
    check_broker(app)
    run = Run(plan.run_id, client, url, inventory=cluster)
    before = None
    if cluster is not None and cluster.any_node_local_storage:
        from coordinator.cluster.outputs import push_inputs

        def before(plan_: Any) -> None:
            run.pushed = [outcome.line() for outcome in push_inputs(cluster, plan_, Path(workdir))]

    publish_run(plan, conversions, client, app, workdir, before_publish=before)
    return run


def get_run(run_id: str, broker_url: str | None = None, tracking_url: str | None = None,
            inventory: InventoryInput = None) -> Run:
    """A handle on an existing run (raises ``RunNotFoundError`` if unknown)."""
    url = resolve_broker_url(broker_url)
    run = Run(run_id, connect_tracking(tracking_url, url), url,
              inventory=load_inventory_input(inventory))
    run.info()
    return run
