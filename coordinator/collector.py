"""The collector: turn a run into ``run_summary.json``, merged outputs and a table.

Success is a file: a job counts as succeeded only if its ``.done`` marker
exists where the collector looks: by default the directory the run's workers
wrote into (their recorded workdir, when this machine sees it), else the one
the run was submitted with. A job its worker recorded as succeeded whose marker
is not there is ``unconfirmed``, not failed: the collector is looking in the
wrong place. Where nodes keep their outputs on their own disks (an inventory
with ``shared_storage = false``), each job's output and marker are first
fetched from the node that ran it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.errors import ExitCode
from coordinator.files import write_json_atomically
from coordinator.mergers import MERGERS, MergeResult
from coordinator.records import JobRecord, RunStatus
from coordinator.report import write_report
from worker_tasks.tracking import JobState, error_lines

if TYPE_CHECKING:  # the cluster code (Fabric) is loaded only when outputs are fetched
    from coordinator.cluster.inventory import Inventory
    from coordinator.cluster.outputs import FetchReport

SUMMARY_NAME = "run_summary.json"
JOBLOG_NAME = "joblog"
REPORT_NAME = "report.html"


@dataclass(frozen=True)
class Collection:
    """The collected run: summary dict, where it was written, merge results."""

    summary: dict[str, Any]
    path: Path
    merged: list[MergeResult]
    status: RunStatus
    fetched: FetchReport | None = None

    @property
    def all_succeeded(self) -> bool:
        return bool(self.summary["all_succeeded"])

    def text(self) -> str:
        """The short table printed after a run (``render``)."""
        return render(self)

    @property
    def exit_code(self) -> ExitCode:
        """0 all succeeded; 1 a job failed (or is not final); 7 only unconfirmed ones."""
        if self.all_succeeded:
            return ExitCode.OK
        states = {job["state"] for job in self.summary["jobs"]}
        halt = self.summary.get("halt") or {}
        if (self.summary.get("halted") and halt.get("on") == "success"
                and JobState.FAILED not in states):
            return ExitCode.OK  # --halt ...,success=N: the rest was not needed
        if states <= {JobState.SUCCEEDED, JobState.SKIPPED, UNCONFIRMED}:
            return ExitCode.UNCONFIRMED
        return ExitCode.JOBS_FAILED


# The collector's word for a job its worker recorded as succeeded whose ``.done`` it cannot
# see (collected in another directory than the workers wrote into): a verdict of the
# collector's, never a stored state.
UNCONFIRMED = "unconfirmed"


def judge(job: JobRecord, workdir: Path,
          fetch_error: str | None = None) -> tuple[JobRecord, bool]:
    """The job's state by the ``.done`` rule, whatever the tracking record says, and whether
    a success its record claims is confirmed by its ``.done`` (False: ``UNCONFIRMED``)."""
    if fetch_error is not None:
        return replace(job, state=JobState.FAILED, error=fetch_error), True
    marker = workdir / job.done_file
    present = marker.exists()
    if present and not job.state.is_success:
        return replace(job, state=JobState.SUCCEEDED), True
    if not present and job.state.is_success:
        return replace(job, error=unconfirmed_reason(job, marker)), False
    return job, True


def unconfirmed_reason(job: JobRecord, marker: Path) -> str:
    """Why a job its worker says succeeded is not confirmed: the paths on both sides."""
    wrote = f" under {job.workdir}" if job.workdir else ""
    return (f"{job.host or 'its worker'} reported success, but {marker.absolute()} does not "
            f"exist on this machine (the worker wrote its files{wrote}): collect where that "
            f"directory is visible (the shared volume), or pass --workdir DIR")


def job_summary(job: JobRecord, verdict: str) -> dict[str, Any]:
    return {
        "job_id": job.job_id, "state": verdict, "node": job.node, "gpu_id": job.gpu_id,
        "attempts": job.attempts, "exit_code": job.exit_code, "duration_s": job.duration_s,
        "started_at": job.started_at, "finished_at": job.finished_at, "host": job.host,
        "log": job.log_file, "output_file": job.output_file, "done_file": job.done_file,
        "error": job.error, "moved_from": job.moved_from,
        # Every attempt: start, end, exit code, host, error (retries included).
        "attempt_history": job.history,
    }


JOBLOG_HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"


def joblog_lines(jobs: list[JobRecord]) -> list[str]:
    """GNU parallel's ``--joblog`` lines, one per attempt (Seq is the job's place in the file)."""
    lines = []
    for seq, job in enumerate(jobs, start=1):
        command = shlex.join([job.script, *job.args])
        for attempt in job.history:
            started = attempt.get("started_at") or 0.0
            runtime = max(0.0, (attempt.get("finished_at") or started) - started)
            code = attempt.get("exit_code")
            exitval, signal = (0, -code) if isinstance(code, int) and code < 0 else (
                code if isinstance(code, int) else -1, 0)
            lines.append(f"{seq}\t{attempt.get('host') or ':'}\t{started:.3f}\t{runtime:8.3f}\t0"
                         f"\t0\t{exitval}\t{signal}\t{command}\n")
    return lines


def write_joblog(path: Path, jobs: list[JobRecord]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(JOBLOG_HEADER + "".join(joblog_lines(jobs)), encoding="utf-8")
    tmp.replace(path)
    return path


def build_summary(status: RunStatus, jobs: list[JobRecord],
                  unconfirmed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The run's summary; ``unconfirmed``: the jobs whose success the collector could not
    confirm (``judge``)."""

    def verdict(job: JobRecord) -> str:
        return UNCONFIRMED if job.job_id in unconfirmed else job.state.value

    nodes: dict[str, dict[str, Any]] = {}
    for job in jobs:
        node = nodes.setdefault(job.node, {"jobs": 0, "succeeded": 0, "failed": 0,
                                           "skipped": 0, "busy_s": 0.0})
        node["jobs"] += 1
        if verdict(job) in node:
            node[verdict(job)] += 1
        node["busy_s"] = round(node["busy_s"] + (job.duration_s or 0.0), 3)
    ends = [job.finished_at for job in jobs if job.finished_at]
    makespan = round(busy_time(jobs), 3)
    ok = sum(1 for job in jobs if verdict(job) in (JobState.SUCCEEDED, JobState.SKIPPED))
    return {
        "run_id": status.run_id,
        "output_dir": status.output_dir,
        "created_at": status.created_at,
        "finished": all(job.state.is_final for job in jobs),
        "jobs_total": len(jobs),
        "counts": {name: sum(1 for job in jobs if verdict(job) == name)
                   for name in [*(state.value for state in JobState), UNCONFIRMED]},
        "succeeded": ok,
        "success_rate": round(ok / len(jobs), 4) if jobs else 0.0,
        "all_succeeded": ok == len(jobs),
        "makespan_s": makespan,
        "wall_s": round(max(ends) - status.created_at, 3) if ends else 0.0,
        "nodes": dict(sorted(nodes.items())),
        # Jobs moved off a node (coordinator move, --failover): from, to, which.
        "moves": status.info.get("moves", []),
        # --halt: the condition, and why the run halted (None while it has not).
        "halt": status.info.get("halt"),
        "halted": status.info.get("halted"),
        "jobs": [job_summary(job, verdict(job)) for job in jobs],
    }


def busy_time(jobs: list[JobRecord]) -> float:
    """The makespan: how long at least one attempt of the run was running, in seconds.

    The union of every attempt's start-to-end interval, so the idle time before a retry or
    a resume (and the jobs a recovered run skipped, which never ran) does not count. For a
    run that is never idle it is the span from the first start to the last end.
    """
    spans = sorted((attempt["started_at"], attempt.get("finished_at") or attempt["started_at"])
                   for job in jobs for attempt in attempts_of(job))
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def attempts_of(job: JobRecord) -> list[dict[str, Any]]:
    """The job's attempts with a start time: its history, or its one attempt's record."""
    history = [attempt for attempt in job.history if attempt.get("started_at")]
    if history:
        return history
    if job.started_at:
        return [{"started_at": job.started_at, "finished_at": job.finished_at}]
    return []


def collect(status: RunStatus, workdir: str | Path | None = None,
            inventory: Inventory | None = None, joblog: str | Path | None = None) -> Collection:
    """Settle every job by its marker, run the merge steps, write the summary.

    ``workdir``: where the markers and the output directory are (default: where the
    workers wrote, see ``RunStatus.files_dir``). With an ``inventory``, outputs of nodes
    without shared storage are first fetched into it (default: the directory the run was
    submitted with); a job whose files could not be fetched fails with the reason.
    """
    fetching = inventory is not None and inventory.any_node_local_storage
    base = (Path(workdir) if workdir is not None else
            status.submitted_dir if fetching else status.files_dir())
    fetched = None
    if fetching:
        from coordinator.cluster.outputs import fetch_outputs

        fetched = fetch_outputs(inventory, [job for job in status.jobs if job.state.is_final],
                                base)
    errors = fetched.errors if fetched else {}
    judged = [judge(job, base, errors.get(job.job_id)) for job in status.jobs]
    jobs = [job for job, _ in judged]
    unconfirmed = frozenset(job.job_id for job, confirmed in judged if not confirmed)
    summary = build_summary(status, jobs, unconfirmed)
    output_dir = Path(status.output_dir)
    merged: list[MergeResult] = []
    for merger in MERGERS:
        claimed = [job for job in jobs if merger.claims(job) and job.state.is_success
                   and job.job_id not in unconfirmed]
        if claimed:
            merged.append(merger.merge(claimed, output_dir, base))
    summary["merged"] = {result.kind: result.details for result in merged}
    summary["joblog"] = str(write_joblog(Path(joblog) if joblog else
                                         base / output_dir / JOBLOG_NAME, jobs))
    summary["report"] = str(write_report(summary, base / output_dir / REPORT_NAME))
    path = write_json_atomically(base / output_dir / SUMMARY_NAME, summary, indent=2)
    return Collection(summary=summary, path=path, merged=merged, status=status, fetched=fetched)


def render(collection: Collection) -> str:
    """The short table printed after a run."""
    summary = collection.summary
    lines = []
    if collection.fetched is not None:
        lines.extend(f"fetch: {outcome.line()}" for outcome in collection.fetched.node_lines)
    skipped = summary["counts"].get(JobState.SKIPPED, 0)
    # Succeeded counts the skipped jobs (their .done existed): the headline says how many, so
    # that it adds up with the table's ok and skipped columns.
    of_them = f", {skipped} of them skipped (their .done existed)" if skipped else ""
    lines += [f"run {summary['run_id']}: {summary['succeeded']}/{summary['jobs_total']} "
              f"succeeded ({summary['success_rate']:.0%}){of_them}, makespan "
              f"{summary['makespan_s']:.1f} s (time with a job running)",
              f"  {'node':<16} {'jobs':>5} {'ok':>5} {'failed':>6} {'skipped':>7} {'busy s':>8}"]
    for name, node in summary["nodes"].items():
        lines.append(f"  {name:<16} {node['jobs']:>5} {node['succeeded']:>5} "
                     f"{node['failed']:>6} {node['skipped']:>7} {node['busy_s']:>8.1f}")
    if summary.get("halted"):
        lines.append(f"  {summary['halted']}; the jobs left were cancelled")
    for move in summary["moves"]:
        lines.append(f"  moved {len(move['jobs'])} jobs from {move['from']} to {move['to']}")
    for job in summary["jobs"]:
        if job["state"] not in (JobState.SUCCEEDED, JobState.SKIPPED):
            error, last = error_lines(job["error"] or "not finished")
            lines.append(f"  {job['state'].upper()} {job['job_id']} on {job['node']}: "
                         f"{error} (log {job['log']})")
            lines.extend(f"      {line}" for line in last)  # the script's own reason
    for result in collection.merged:
        lines.extend(result.lines)
    lines.append(f"summary written to {collection.path} (timeline: {summary['report']})")
    return "\n".join(lines)
