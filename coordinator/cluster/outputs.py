"""Node-local storage: inputs go to the node before a run, outputs come home after it.

When a node's ``shared_storage`` is false the head node cannot see what its
jobs wrote. ``fetch_outputs`` brings each job's output file and ``.done``
marker (and the log of a failed job) from the node that ran it into the head
node's workdir, output first and marker last, so a marker at home always has
its output beside it. ``push_inputs`` sends the Step 3 inputs a run needs
(chunk and history files that exist only on the head node) to its nodes.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from coordinator.cluster.group import Cluster, NodeOutcome
from coordinator.cluster.inventory import Inventory
from coordinator.cluster.remote import NodeError, RemoteNode
from coordinator.cluster.sync import Fetch, check_relative, fetch_file, push
from coordinator.errors import NodeFailedError
from coordinator.plan import Plan, flag_value
from coordinator.records import JobRecord
from worker_tasks.spec import FLOATING_NODE, JobSpec, node_of_slot, slot_of_worker

# Arguments of the Step 3 script that name input files (pushed to nodes that need them).
SCORING_INPUT_FLAGS = ("--seeds-file", "--train-history")


@dataclass
class FetchReport:
    """What fetching did: files moved or already home, and each job it could not settle."""

    fetched: int = 0
    present: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # job_id -> one line
    node_lines: list[NodeOutcome] = field(default_factory=list)


def node_of(job: JobRecord, inventory: Inventory) -> str:
    """The label of the node that ran the job: from its worker name (``label@host``)."""
    if job.host:
        label = node_of_slot(slot_of_worker(job.host))
        if label in inventory.nodes:
            return label
    return job.node


def fetch_outputs(inventory: Inventory, jobs: Iterable[JobRecord], workdir: Path) -> FetchReport:
    """Bring home, per job, its output and ``.done`` (and a failed job's log); in parallel."""
    report = FetchReport()
    by_node: dict[str, list[JobRecord]] = defaultdict(list)
    for job in jobs:
        label = node_of(job, inventory)
        node = inventory.nodes.get(label)
        if node is None:
            report.errors[job.job_id] = f"node {label} is not in the inventory: not fetched"
        elif not node.config.shared_storage:
            by_node[label].append(job)
    if not by_node:
        return report
    with Cluster(inventory, by_node) as cluster:
        outcomes = cluster.each(lambda remote: fetch_node(remote, by_node[remote.label], workdir))
    for outcome in outcomes:
        report.node_lines.append(outcome)
        if outcome.ok:
            moved, present, errors = outcome.value
            report.fetched += moved
            report.present += present
            report.errors.update(errors)
        else:
            for job in by_node[outcome.label]:
                report.errors.setdefault(job.job_id, f"could not fetch from node "
                                                     f"{outcome.label}: {outcome.message}")
    return report


def fetch_node(remote: RemoteNode, jobs: list[JobRecord],
               workdir: Path) -> tuple[str, tuple[int, int, dict[str, str]]]:
    """One node's share of ``fetch_outputs``, over one SFTP session.

    Returns its line and (files moved, files already home, job_id -> error).
    """
    sftp = remote.sftp()
    moved = present = 0
    errors: dict[str, str] = {}
    try:
        for job in jobs:
            try:
                files = job_fetches(remote, job, workdir, sftp)
            except NodeError as err:
                errors[job.job_id] = str(err)
                continue
            for item in files:
                try:
                    if fetch_file(sftp, item):
                        moved += 1
                    else:
                        present += 1
                except (OSError, paramiko.SSHException) as err:
                    reason = "not on the node" if isinstance(err, FileNotFoundError) else err
                    errors[job.job_id] = (f"could not fetch {item.remote} from node "
                                          f"{remote.label}: {reason}")
                    break
    finally:
        sftp.close()
    return (f"fetched {moved} files ({present} already here) for {len(jobs)} jobs",
            (moved, present, errors))


def job_fetches(remote: RemoteNode, job: JobRecord, workdir: Path,
                sftp: paramiko.SFTPClient) -> list[Fetch]:
    """The files to bring home for one job, in order: output, then marker; else the log."""
    node = remote.node

    def item(relative: str) -> Fetch:
        if posixpath.isabs(relative):
            raise NodeError(f"{relative} is an absolute path on node {remote.label}; only "
                            f"paths under its workdir can be fetched")
        return Fetch(remote=node.remote_path(check_relative(relative)),
                     local=workdir / relative)

    marker = item(job.done_file)
    try:
        sftp.stat(marker.remote)
    except FileNotFoundError:
        if job.state.is_success:
            raise NodeError(f"recorded {job.state} but no marker {marker.remote} on node "
                            f"{remote.label}") from None
        # No success on the node: bring the log home so the user can read why.
        if job.log_file and job.state.is_final:
            log = item(job.log_file)
            try:
                sftp.stat(log.remote)
                return [log]
            except FileNotFoundError:
                return []
        return []
    except (OSError, paramiko.SSHException) as err:
        raise NodeError(f"could not read {marker.remote} on node {remote.label}: {err}") from None
    return ([item(job.output_file)] if job.output_file else []) + [marker]


def input_files(plan: Plan, workdir: Path) -> dict[str, dict[str, Path]]:
    """node label -> {relative path: local file}: Step 3 inputs that exist on the head node."""
    wanted: dict[str, dict[str, Path]] = defaultdict(dict)
    for spec in plan.specs:
        for flag in SCORING_INPUT_FLAGS:
            value = flag_value(spec.args, flag)
            if value is None or posixpath.isabs(value):
                continue
            local = workdir / value
            if local.is_file():
                wanted[spec.node][posixpath.normpath(value)] = local
    return wanted


def push_inputs(inventory: Inventory, plan: Plan, workdir: Path) -> list[NodeOutcome]:
    """Send each node without shared storage the input files its jobs name (and those of
    the floating jobs, which any node may take).

    Raises ``NodeFailedError`` if any node could not take them: the run is not
    published (its jobs would only fail for a missing file).
    """
    by_node = input_files(plan, workdir)
    # A floating job may run on any node: its inputs go to every one (sync sends only what
    # differs, so a file several jobs name travels once per node).
    floating = by_node.pop(FLOATING_NODE, {})
    wanted = {label: {**by_node.get(label, {}), **floating} for label in inventory.nodes
              if not inventory.nodes[label].config.shared_storage
              and (label in by_node or floating)}
    if not wanted:
        return []
    with Cluster(inventory, wanted) as cluster:
        outcomes = cluster.each(lambda remote: "inputs: " + push(
            remote, wanted[remote.label], remote.node.config.workdir).line())
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if failed:
        raise NodeFailedError(f"could not push inputs to node {failed[0].label}: "
                              f"{failed[0].message}; nothing was published")
    return outcomes


def markers_on_nodes(inventory: Inventory, specs: list[JobSpec]) -> set[str]:
    """The jobs among ``specs`` whose ``.done`` exists on their node (node-local storage).

    Raises ``NodeFailedError`` if a node cannot be asked: a recovery must not
    publish again a job that may be done.
    """
    by_node: dict[str, list[JobSpec]] = defaultdict(list)
    local = [label for label, node in inventory.nodes.items() if not node.config.shared_storage]
    for spec in specs:
        # A floating job's marker may be on whichever node ran it.
        for label in local if spec.floating else [spec.node]:
            if label in local:
                by_node[label].append(spec)
    if not by_node:
        return set()

    def look(remote: RemoteNode) -> tuple[str, set[str]]:
        sftp = remote.sftp()
        found: set[str] = set()
        try:
            for spec in by_node[remote.label]:
                with contextlib.suppress(FileNotFoundError):
                    sftp.stat(remote.node.remote_path(check_relative(spec.done_file)))
                    found.add(spec.job_id)
        finally:
            sftp.close()
        return f"{len(found)} of {len(by_node[remote.label])} jobs done", found

    with Cluster(inventory, by_node) as cluster:
        outcomes = cluster.each(look)
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if failed:
        raise NodeFailedError(f"could not look for .done files on node {failed[0].label}: "
                              f"{failed[0].message}; nothing was published")
    return set().union(*(outcome.value for outcome in outcomes))
