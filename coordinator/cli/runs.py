"""Run verbs: submit, status, runs, wait, collect, cancel, retry; and ``scripts-coordinator``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator.cli.common import (
    ENVIRONMENT,
    EXIT_MEANINGS,
    PROG,
    ArgumentParser,
    CommandFactory,
    add_inventory_flag,
    existing_dir,
    exit_table,
    formatter,
    speeds_line,
)
from coordinator.errors import ExitCode, InvalidJobsError, RunNotFoundError
from coordinator.options import (
    DEFAULT_CHUNK_DIR,
    DEFAULT_OUTPUT_DIR,
    DEFAULTS,
    NO_WORKER_TIMEOUT_S,
    SubmitOptions,
)

if TYPE_CHECKING:  # the verbs import these when they run: --help stays quick
    from coordinator.cluster import Inventory
    from coordinator.plan import Plan
    from coordinator.records import JobRecord, RunStatus
    from coordinator.run import Run, Service

# A run with more jobs lists only the interesting ones in `status` (unless --all).
STATUS_LIST_LIMIT = 200
QUIET_STATES = ("queued", "succeeded", "skipped")  # JobState values


E = ExitCode
# What each run command can end with (``--help`` prints these; tests reach each one).
FOLLOWED = ((E.OK, "every job succeeded (without --wait: the run was published)"),
            (E.JOBS_FAILED, "with --wait: at least one job failed (or was cancelled, or is lost)"),
            E.BROKER_UNREACHABLE, (E.WAIT_TIMEOUT, "with --wait: --timeout passed first (the "
                                                    "run goes on)"),
            (E.CLUSTER_FAILED, "inputs could not be pushed to a node (node-local storage)"),
            (E.UNCONFIRMED, "with --wait: " + EXIT_MEANINGS[E.UNCONFIRMED]),
            (E.NO_WORKER, "with --wait: " + EXIT_MEANINGS[E.NO_WORKER]))
SUBMIT_EXITS = FOLLOWED
STATUS_EXITS = ((E.OK, "no job failed (the run may still be going)"),
                (E.JOBS_FAILED, "at least one job failed, was cancelled or is lost"),
                E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND)
RUNS_EXITS = ((E.OK, "listed (also when there are none)"), E.BROKER_UNREACHABLE)
WAIT_EXITS = ((E.OK, "every job succeeded"), E.JOBS_FAILED,
              (E.BROKER_UNREACHABLE, "Redis unreachable for longer than $SC_RECONNECT_TIMEOUT"),
              (E.RUN_NOT_FOUND, "unknown run id, or its records vanished while waiting"),
              E.WAIT_TIMEOUT, E.UNCONFIRMED, E.NO_WORKER)
COLLECT_EXITS = ((E.OK, "every job succeeded"),
                 (E.JOBS_FAILED, "at least one job failed or is not final yet"),
                 E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND, E.UNCONFIRMED)
LOG_EXITS = ((E.OK, "printed (--follow: the job ended, or Ctrl-C)"),
             (E.INVALID_INPUT, "no such job in the run, or no such attempt"),
             E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND,
             (E.CLUSTER_FAILED, "the node that holds the log could not be read"))
ACCT_EXITS = ((E.OK, "printed"), E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND)
REPORT_EXITS = ((E.OK, "the page was written"), E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND)
CANCEL_EXITS = ((E.OK, "every job not yet final was cancelled (0 of a finished run)"),
                E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND)
RETRY_EXITS = ((E.OK, "published again (with --wait: and every job succeeded)"),
               (E.JOBS_FAILED, "with --wait: at least one job failed again"),
               E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND,
               (E.WAIT_TIMEOUT, "with --wait: --timeout passed first"),
               (E.UNCONFIRMED, "with --wait: " + EXIT_MEANINGS[E.UNCONFIRMED]),
               (E.NO_WORKER, "with --wait: " + EXIT_MEANINGS[E.NO_WORKER]))
MOVE_EXITS = ((E.OK, "moved (or nothing to move)"), E.BROKER_UNREACHABLE, E.RUN_NOT_FOUND)


def add_original_flags(parser: argparse.ArgumentParser) -> None:
    """The original tool's flags, unchanged in name, default and meaning."""
    parser.add_argument("--jobs-file", required=True, metavar="FILE",
                        help="JSON list of jobs (job_id, script, args, node, gpu_id); refused "
                             "whole if any job is invalid")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                        help="base output directory (default: %(default)s); each job's "
                             "--output-file becomes DIR/<its basename>")
    parser.add_argument("--preserve-paths", action="store_true",
                        help="pass args untouched: no --output-file rewriting (Step 5)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (jobs per node, final paths); publish nothing")
    parser.add_argument("--chunk-dir", default=DEFAULT_CHUNK_DIR, metavar="DIR",
                        help="where inline seeds of legacy scoring jobs are written "
                             "(default: %(default)s)")


def add_workdir_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--workdir`` of a verb that reads a run's files: where ``what``, seen from here."""
    parser.add_argument("--workdir", metavar="DIR",
                        help=f"where {what}, seen from here (default: the directory the run's "
                             f"workers wrote into when this machine sees it, else the one it "
                             f"was submitted with)")


def add_collect_flags(parser: argparse.ArgumentParser) -> None:
    add_workdir_flag(parser, "the .done files and the output directory are")
    parser.add_argument("--joblog", metavar="FILE",
                        help="GNU parallel's joblog format, one line per attempt (default: "
                             "OUTPUT_DIR/joblog, beside run_summary.json)")
    add_inventory_flag(parser)


def add_scripts_check_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scripts-dir", metavar="DIR", type=existing_dir,
                        help="where the workers' scripts are, as this machine sees them: a job "
                             "whose script is not there (nor built in) is refused before "
                             "anything is published, --dry-run included (default: not checked "
                             "here; the worker refuses it)")


def add_follow_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of every command that follows a run to its end and collects it."""
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="give up waiting after S seconds (exit 5; the run goes on)")
    parser.add_argument("--no-worker-timeout", type=float, default=NO_WORKER_TIMEOUT_S,
                        metavar="S",
                        help="give up waiting (exit 8; the run goes on) once no worker has "
                             "served any of the run's waiting jobs, none running, for S seconds "
                             "(default: %(default)g, $SC_NO_WORKER_TIMEOUT; 0: wait for ever)")
    parser.add_argument("--failover", type=float, metavar="S",
                        help="move the queued jobs of a node that has had no live worker for S "
                             "seconds to the nodes with the shortest queues (pinned jobs stay)")
    add_collect_flags(parser)


def add_retry_flags(parser: argparse.ArgumentParser) -> None:
    """Placement (per-GPU, balance) and automatic retries, for every command that submits."""
    parser.add_argument("--per-gpu", action="store_true",
                        help="one job at a time per GPU of a node (its gpu_id), not per node: "
                             "queues node.NODE.gpuK, one worker per GPU (worker --gpu K)")
    parser.add_argument("--balance", action="store_true",
                        help="every job without \"pin\": true floats: the first free node (or "
                             "GPU, with --per-gpu) takes it, whatever node the file names; for "
                             "mixed clusters (see docs/step3.md)")
    parser.add_argument("--retries", type=int, default=DEFAULTS.retries, metavar="N",
                        help="retry a failed attempt up to N times on the same node, for jobs "
                             "that set no 'retries' (default: %(default)s)")
    parser.add_argument("--retry-delay", type=float, default=DEFAULTS.retry_delay, metavar="S",
                        help="base of the exponential backoff (with jitter) between attempts "
                             "(default: %(default)s s)")
    parser.add_argument("--job-timeout", metavar="S|P%",
                        help="kill a job's attempt after S seconds, or after P%% of the median "
                             "duration of this run's succeeded jobs of the same script once 3 "
                             "have succeeded (GNU parallel's --timeout 300%%), for jobs that "
                             "set no \"timeout\"; --timeout bounds the wait of this command, "
                             "not the jobs")
    parser.add_argument("--halt", metavar="WHEN,WHAT=N|P%",
                        help="stop the run by itself, as GNU parallel's --halt: soon,fail=3 (no "
                             "job starts once 3 failed; running ones finish), now,fail=10%% "
                             "(once 10%% of the jobs ended so far failed, at least 3 ended: "
                             "running ones are killed too), now,success=1 (the first success "
                             "is enough: exit 0); the jobs left end cancelled with the reason")
    parser.add_argument("--no-speculate", dest="speculate", action="store_false", default=None,
                        help="never start a backup copy of a straggling job (by default, while "
                             "this command follows the run, a floating job that an idle slot "
                             "would finish sooner gets one copy there; the first to succeed "
                             "wins, see docs/step3.md); per job: \"speculate\": false")
    parser.add_argument("--after", dest="after_runs", type=run_list, metavar="RUN[,RUN]",
                        help="hold this run until each RUN has succeeded (Slurm's afterok): it "
                             "is recorded and published now, and starts by itself, with or "
                             "without this command still here; if one fails, it ends "
                             "cancelled, e.g. --after 20261206-101500-3f9a1c")
    parser.add_argument("--after-any", action="store_true",
                        help="with --after: start once each RUN has ended, whatever its "
                             "outcome (afterany)")


def run_list(text: str) -> tuple[str, ...]:
    """``--after RUN[,RUN]``: run ids, each checked as a name."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or not all(name.replace("-", "").isalnum() for name in names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of run ids")
    return names


def add_run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", metavar="RUN",
                        help="run id printed by submit (default: the newest run)")


def inventory_of(args: argparse.Namespace) -> Inventory | None:
    """The inventory of a command that collects (it has ``--inventory``), else None."""
    from coordinator.cluster import inventory_in_force

    if not hasattr(args, "inventory") or inventory_in_force(args.inventory) is None:
        return None  # checked first: a command without an inventory never loads its model
    from coordinator.cluster import find_inventory

    return find_inventory(args.inventory)


def resolve_run(args: argparse.Namespace) -> Run:
    from coordinator.run import get_run, latest_run

    inventory = inventory_of(args)
    if args.run_id:
        return get_run(args.run_id, args.broker, inventory=inventory)
    return latest_run(args.broker, inventory=inventory)


def notice(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def follow(run: Run, args: argparse.Namespace, detached: bool = True) -> int:
    """Wait with progress, collect, print the table; the exit status of the run.

    ``detached``: the run lives on a cluster that outlives this command (not ``local``).
    """
    from coordinator.progress import ProgressDisplay  # rich loads only to follow a run

    try:
        with ProgressDisplay() as progress:
            run.wait(timeout=args.timeout, on_progress=progress, workdir=args.workdir,
                     failover=getattr(args, "failover", None), notice=progress.notice(notice),
                     no_worker_timeout=getattr(args, "no_worker_timeout", None) or None)
    except KeyboardInterrupt:
        if detached:
            print(f"{PROG}: stopped following run {run.id}; it goes on without this command "
                  f"(coordinator wait {run.id} / coordinator cancel {run.id})", file=sys.stderr)
        raise
    collection = run.collect(args.workdir, joblog=getattr(args, "joblog", None))
    print(collection.text(), flush=True)
    return collection.exit_code


def prepare_args(args: argparse.Namespace, **overrides: object) -> Plan:
    """The plan of a command line's jobs file and options (nothing written)."""
    from coordinator.run import prepare

    return prepare(args.jobs_file, SubmitOptions.from_args(args, **overrides))


def print_plan(plan: Plan) -> None:
    for conversion in plan.conversions:
        print(conversion.note)
    print(plan.describe())
    print("dry run: nothing published")
    if plan.options.scripts_dir is None:
        notice("the jobs' scripts were not checked here (they live on the workers; "
               "--scripts-dir DIR checks them before anything is published)")


def cmd_submit(args: argparse.Namespace, plan: Plan | None = None) -> int:
    """``submit``, ``recover`` and ``scripts-coordinator``: prepare (or take ``plan``), publish."""
    from coordinator.run import publish

    plan = plan or prepare_args(args)
    if args.dry_run:
        print_plan(plan)
        return ExitCode.OK
    recovering = getattr(args, "recover", False)
    resuming = not recovering and not getattr(args, "new_run", True)
    run = publish(plan, broker_url=args.broker, recover=recovering, resume=resuming,
                  notice=notice)
    info = run.info()  # read once: everything below says what the run recorded
    if run.resumed:
        print(f"resuming run {run.id}: the same jobs and output directory, published from "
              f"{info.get('submitted_from', '?')} and still under way (--new-run "
              f"publishes them again instead)", file=sys.stderr)
        return follow(run, args)
    if recovering:
        print(f"recovered run {run.id}: {info.recovered} jobs already done (their .done "
              f"exists), the others published", file=sys.stderr)
    for line in info.pushed:
        print(f"pushed {line}", file=sys.stderr)
    for line in info.publish_notes:
        print(f"{PROG}: warning: {line}", file=sys.stderr)
    print(json.dumps({"run_id": run.id}) if args.json else run.id, flush=True)
    published = sum(info.planned.values()) - info.recovered
    skipped = f" ({info.recovered} already done, not published)" if recovering else ""
    print(f"published {published} jobs{skipped}; follow with: coordinator wait {run.id}",
          file=sys.stderr)
    warn_unserved(run.service(info))
    if args.wait:
        return follow(run, args)
    return ExitCode.OK


def cmd_adapter(args: argparse.Namespace) -> int:
    """The old adapter's routes (script job, or legacy inline seeds converted), then the run."""
    plan = prepare_args(args)
    converted = {conversion.job.job_id: conversion for conversion in plan.conversions}
    for spec in plan.specs:
        conversion = converted.get(spec.job_id)
        if conversion is not None:
            seeds = conversion.job.args[conversion.job.args.index("--seeds-file") + 1]
            print(f"route {spec.job_id}: legacy scoring job (inline seeds) -> {spec.script} "
                  f"on {spec.node}, seeds in {seeds}")
        else:
            print(f"route {spec.job_id}: script job -> {spec.script} on {spec.node}")
    sys.stdout.flush()
    return cmd_submit(args, plan)


def warn_unserved(service: Service) -> None:
    """Say which nodes (or GPUs) have no worker: their jobs would wait silently otherwise."""
    for gap in service.gaps():
        if gap.floating:
            print(f"{PROG}: warning: no worker is up to take the {gap.jobs} floating jobs (queue "
                  f"node.{gap.slot}); any worker takes them once it starts", file=sys.stderr)
            continue
        gpu, node = gap.gpu, gap.node
        start = (f"coordinator worker --node {node}" + (f" --gpu {gpu}" if gpu is not None
                                                        else "") +
                 f" (or coordinator cluster up {node}{' --per-gpu' if gpu is not None else ''})")
        kind = "per-GPU" if gpu is None else "whole-node"
        hint = (f"; the node's workers are {kind} ({', '.join(gap.other_kind)}): "
                f"{'submit with --per-gpu' if gpu is None else 'submit without --per-gpu'}, "
                f"or start: {start}" if gap.other_kind else f": {start}")
        what = f"GPU {gpu} of node {node}" if gpu is not None else f"node {node}"
        print(f"{PROG}: warning: no worker serves {what} (queue node.{gap.slot}); its "
              f"{gap.jobs} jobs wait until one starts{hint}", file=sys.stderr)


def cmd_runs(args: argparse.Namespace) -> int:
    from coordinator.run import recent_runs

    runs = recent_runs(args.limit, args.broker)
    if not runs:
        print("no runs recorded in this Redis yet")
    for run in runs:
        try:
            status = run.status()
        except RunNotFoundError:  # expired since it was listed
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.created_at))
        held = f"  ({status.hold_text()})" if status.hold_text() else ""
        print(f"{run.id}  {created}  {status.outcome:<10} {status.line()}{held}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from coordinator.records import JobState
    from coordinator.run import UNASSIGNED_QUEUE

    run = resolve_run(args)
    if not args.no_check:
        for line in run.settle(workdir=args.workdir):
            notice(line)
    # The job lines need no message fields: a 100,000-job run reads in a second or two.
    status = run.status(light=not args.json)
    if args.json:
        print(json.dumps({"run_id": status.run_id, "state": status.state,
                          "outcome": status.outcome, "finished": status.finished,
                          "counts": {str(k): v for k, v in status.counts.items()},
                          "after_runs": status.info.get("after_runs") or {},
                          "hold": status.hold_text(),
                          "jobs": [vars(job) for job in status.jobs]}, default=str, indent=2))
        return status_exit(status)
    print(f"run {status.run_id} ({status.outcome}): {status.line()}")
    if status.hold_text():
        print(f"  {status.hold_text()}")
    # The presence registry: one read at any width (a killed worker shows for up to 10 s).
    # By node: per-GPU workers (rig-a.gpu0, rig-a.gpu1) serve their node's jobs.
    service = run.service()
    if service.refusing:  # a line only where a worker requires signatures
        notice(f"unsigned: run {status.run_id}'s jobs were published unsigned (no head key: "
               f"coordinator cluster init makes one), and {', '.join(service.refusing)} run "
               f"only signed jobs: they refuse them")
    if service.unassigned:
        print(f"  warning: {service.unassigned} messages wait in {UNASSIGNED_QUEUE}, a "
              f"queue no worker consumes (published without a node's queue)")
    for script, speeds in run.speeds().items():
        print(f"  {speeds_line(script, speeds)}")
    by_node = status.by_node()
    served = run.workers(by_node)
    alive = {worker for workers in served.values() for worker in workers}
    every = args.all or status.total <= STATUS_LIST_LIMIT
    listed = 0
    for node, jobs in by_node.items():
        workers = ", ".join(served.get(node, [])) or "no worker running"
        counts = Counter(job.state for job in jobs)
        tally = ", ".join(f"{counts[state]} {state}" for state in JobState if counts[state])
        print(f"  node {node} ({workers}): {len(jobs)} jobs: {tally}")
        for job in jobs:
            if not every and (job.state.value in QUIET_STATES or listed >= STATUS_LIST_LIMIT):
                continue
            listed += 1
            print(f"    {job_line(job, node, alive)}")
    if not every:
        print(f"  ({status.total} jobs: only those running, failed, cancelled or lost are "
              f"listed, at most {STATUS_LIST_LIMIT}; --all lists every one)")
    return status_exit(status)


def status_exit(status: RunStatus) -> ExitCode:
    """``status``: 1 once a job failed, was cancelled or is lost (whatever else still runs)."""
    return ExitCode.JOBS_FAILED if status.troubled else ExitCode.OK


def job_line(job: JobRecord, node: str, alive: set[str]) -> str:
    from coordinator.records import JobState

    extra = f" exit {job.exit_code}" if job.exit_code not in (None, 0) else ""
    extra += f" {job.duration_s:.1f} s" if job.duration_s is not None else ""
    if job.moved_from:
        extra += f"  (moved from {job.moved_from})"
    if job.state is JobState.HELD:
        extra += f"  (waits for {', '.join(job.after)})"
    error, last = job.error_lines()
    if error:
        extra += f"  {error}"
    if job.state is JobState.RUNNING and job.host not in alive:
        extra += (f"  (its worker {job.host} does not answer: the job runs again once "
                  f"a worker serves {node} and the visibility timeout has passed)")
    reason = "".join(f"\n      {line}" for line in last)  # the script's own last words
    return f"{job.job_id:<24} {job.state:<10} attempts {job.attempts}{extra}{reason}"


def cmd_wait(args: argparse.Namespace) -> int:
    return follow(resolve_run(args), args)


def cmd_collect(args: argparse.Namespace) -> int:
    run = resolve_run(args)
    collection = run.collect(args.workdir, fetch=True if args.fetch else None,
                             joblog=args.joblog)
    print(collection.text())
    if not collection.summary["finished"]:
        print(f"{PROG}: run {collection.summary['run_id']} is not finished", file=sys.stderr)
    return collection.exit_code


def cmd_log(args: argparse.Namespace) -> int:
    run = resolve_run(args)
    if args.follow:
        if args.attempt is not None:
            raise InvalidJobsError("log: --follow shows every attempt as it comes; leave out "
                                   "--attempt")
        try:
            for chunk in run.follow_log(args.job_id, args.workdir):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # the job goes on
        return ExitCode.OK
    text, where = run.log(args.job_id, args.attempt, args.workdir)
    print(f"{PROG}: log of job {args.job_id} of run {run.id}: {where}", file=sys.stderr,
          flush=True)
    if args.attempt is not None and not text:
        raise InvalidJobsError(f"job {args.job_id} of run {run.id} has no attempt "
                               f"{args.attempt} in its log")
    sys.stdout.write(text)
    return ExitCode.OK


def cmd_acct(args: argparse.Namespace) -> int:
    rows = resolve_run(args).accounting()
    if args.json:
        print(json.dumps(rows, indent=2))
        return ExitCode.OK
    print(f"{'JOB':<24} {'ATT':>3} {'NODE':<12} {'GPU':>3} {'START':<19} {'ELAPSED':>9} "
          f"{'CPU':>9} {'MAXRSS':>9} EXIT")
    for row in rows:
        start = (time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(row["started_at"]))
                 if row["started_at"] else "-")
        exit_text = ("superseded" if row["superseded"] else
                     f"signal {row['signal']}" if row["signal"] is not None else
                     "-" if row["exit_code"] is None else str(row["exit_code"]))
        print(f"{row['job_id']:<24} {row['attempt'] or '-':>3} {row['node']:<12} "
              f"{row['gpu']:>3} {start:<19} {seconds(row['elapsed_s']):>9} "
              f"{seconds(row['cpu_s']):>9} {megabytes(row['max_rss_mb']):>9} {exit_text}")
    return ExitCode.OK


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}M"


def cmd_report(args: argparse.Namespace) -> int:
    from coordinator.report import render_png, write_report

    if args.summary:  # a finished run, from its run_summary.json (no Redis needed)
        try:
            summary = json.loads(Path(args.summary).read_text(encoding="utf-8"))
            output_dir = Path(args.summary).parent
        except (OSError, ValueError) as err:
            raise InvalidJobsError(f"--summary {args.summary}: {err}") from None
    else:
        summary, output_dir = resolve_run(args).timeline_input(args.workdir)
    out = Path(args.out) if args.out else output_dir / "report.html"
    print(f"timeline of run {summary['run_id']} written to {write_report(summary, out)}")
    if args.png:
        try:
            png = render_png(out, Path(args.png), rows=len(summary["nodes"]))
        except RuntimeError as err:
            raise InvalidJobsError(str(err)) from None
        print(f"and rendered to {png}")
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    run = resolve_run(args)
    print(f"run {run.id}: cancelled {run.cancel()} queued or running jobs")
    return ExitCode.OK


def cmd_retry(args: argparse.Namespace) -> int:
    run = resolve_run(args)
    count = run.retry_failed(lost=args.lost)
    which = "lost" if args.lost else "failed, cancelled or lost"
    print(f"run {run.id}: published {count} {which} jobs again")
    if args.wait and count:
        return follow(run, args)
    return ExitCode.OK


def cmd_move(args: argparse.Namespace) -> int:
    run = resolve_run(args)
    targets = [name for name in args.to.split(",") if name]
    moved = run.move(args.source, targets)
    if not moved:
        print(f"run {run.id}: nothing to move from {args.source} (no queued, lost or abandoned "
              f"jobs; pinned jobs stay)")
    for target, job_ids in moved.items():
        print(f"run {run.id}: moved {len(job_ids)} jobs from {args.source} to {target}: "
              f"{', '.join(job_ids[:10])}{' ...' if len(job_ids) > 10 else ''}")
    return ExitCode.OK


def register(command: CommandFactory) -> None:
    sub = command("submit", "validate a jobs file and publish it; prints the run id",
                  "coordinator submit --jobs-file scoring_jobs.json --output-dir results --wait",
                  SUBMIT_EXITS)
    add_original_flags(sub)
    add_retry_flags(sub)
    add_scripts_check_flag(sub)
    sub.add_argument("--wait", action="store_true",
                     help="follow the run with progress, then collect (like scripts-coordinator)")
    add_follow_flags(sub)
    sub.add_argument("--json", action="store_true", help="print the run id as JSON")
    sub.set_defaults(handler=cmd_submit)

    sub = command("recover", "re-create a run whose records Redis lost, from its jobs file and "
                             "the .done files: only jobs without a .done are published",
                  "coordinator recover --jobs-file scoring_jobs.json --output-dir results --wait",
                  SUBMIT_EXITS)
    add_original_flags(sub)
    add_retry_flags(sub)
    add_scripts_check_flag(sub)
    sub.add_argument("--wait", action="store_true", help="follow the run, then collect")
    add_follow_flags(sub)
    sub.add_argument("--json", action="store_true", help="print the run id as JSON")
    sub.set_defaults(handler=cmd_submit, recover=True)

    sub = command("status", "show a run's jobs and their states (records settled first)",
                  "coordinator status 20261129-081500-3f9a1c --json", STATUS_EXITS)
    add_run_arg(sub)
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    add_workdir_flag(sub, ".done files are visible, to settle stuck records")
    sub.add_argument("--no-check", action="store_true",
                     help="print the records as they are: no settling against .done files, "
                          "workers and queues (faster)")
    sub.add_argument("--all", action="store_true",
                     help=f"list every job (by default a run of more than {200} jobs lists only "
                          f"those running, failed, cancelled or lost)")
    sub.set_defaults(handler=cmd_status)

    sub = command("runs", "list the newest runs with their progress",
                  "coordinator runs --limit 5", RUNS_EXITS)
    sub.add_argument("--limit", type=int, default=10, help="how many runs (default: 10)")
    sub.set_defaults(handler=cmd_runs)

    sub = command("wait", "follow a run with a live progress display until every job is final",
                  "coordinator wait 20261129-081500-3f9a1c --timeout 900", WAIT_EXITS)
    add_run_arg(sub)
    add_follow_flags(sub)
    sub.set_defaults(handler=cmd_wait)

    sub = command("collect", "write run_summary.json (and merged outputs) and print the table",
                  "coordinator collect 20261129-081500-3f9a1c --fetch", COLLECT_EXITS)
    add_run_arg(sub)
    add_collect_flags(sub)
    sub.add_argument("--fetch", action="store_true",
                     help="first fetch each job's output and .done from the node that ran it "
                          "(nodes with shared_storage = false); needs the inventory")
    sub.set_defaults(handler=cmd_collect)

    sub = command("log", "print a job's log wherever it was written: here, or on its node "
                         "over SSH (the inventory)",
                  "coordinator log 20261129-081500-3f9a1c chunk_0007 --attempt 2\n"
                  "  coordinator log 20261129-081500-3f9a1c chunk_0007 --follow", LOG_EXITS)
    sub.add_argument("run_id", metavar="RUN", help="run id printed by submit")
    sub.add_argument("job_id", metavar="JOB", help="the job's id in the jobs file")
    sub.add_argument("--attempt", type=int, metavar="N",
                     help="only attempt N (each attempt opens with a line of its own)")
    sub.add_argument("--follow", action="store_true",
                     help="go on printing as the job writes, until it ends (Ctrl-C stops "
                          "following; the job goes on)")
    add_workdir_flag(sub, "the run's log directory is")
    add_inventory_flag(sub)
    sub.set_defaults(handler=cmd_log)

    sub = command("acct", "every attempt of a run's jobs: node, GPU, start, elapsed, CPU "
                          "seconds of its whole process tree, its largest RSS, exit (sacct)",
                  "coordinator acct 20261129-081500-3f9a1c --json", ACCT_EXITS)
    add_run_arg(sub)
    sub.add_argument("--json", action="store_true",
                     help="a JSON list of attempts: job_id, attempt, node, gpu, host, "
                          "started_at, finished_at, elapsed_s, cpu_s, max_rss_mb, gpu_mem_mb "
                          "(peak, where NVML can tell), exit_code, signal, error")
    sub.set_defaults(handler=cmd_acct)

    sub = command("report", "where a run's time went: an HTML page with a timeline per node",
                  "coordinator report 20261129-081500-3f9a1c --out run.html --png run.png",
                  REPORT_EXITS)
    add_run_arg(sub)
    sub.add_argument("--out", metavar="FILE",
                     help="the HTML file (default: WORKDIR/OUTPUT_DIR/report.html)")
    sub.add_argument("--png", metavar="FILE",
                     help="also a PNG screenshot of it (needs Chromium)")
    sub.add_argument("--summary", metavar="FILE",
                     help="draw a finished run from its run_summary.json instead of Redis "
                          "(e.g. after coordinator local)")
    add_workdir_flag(sub, "the output directory is")
    sub.set_defaults(handler=cmd_report)

    sub = command("cancel", "drop a run's queued jobs and terminate its running ones",
                  "coordinator cancel 20261129-081500-3f9a1c", CANCEL_EXITS)
    add_run_arg(sub)
    sub.set_defaults(handler=cmd_cancel)

    sub = command("retry", "publish a run's failed, cancelled and lost jobs again",
                  "coordinator retry 20261129-081500-3f9a1c --lost --wait", RETRY_EXITS)
    add_run_arg(sub)
    sub.add_argument("--lost", action="store_true",
                     help="only the lost jobs (their messages vanished: a purge, a broker "
                          "restarted without persistence)")
    sub.add_argument("--wait", action="store_true", help="follow the run, then collect")
    add_follow_flags(sub)
    sub.set_defaults(handler=cmd_retry)

    sub = command("move", "move a run's queued jobs off a node (a dead one) onto others",
                  "coordinator move 20261129-081500-3f9a1c --from rig-c --to rig-a,rig-b",
                  MOVE_EXITS)
    add_run_arg(sub)
    sub.add_argument("--from", dest="source", required=True, metavar="NODE",
                     help="the node whose queued (and abandoned running) jobs move")
    sub.add_argument("--to", required=True, metavar="NODE[,NODE...]",
                     help="where they go, each job to the one with the least work waiting; "
                          "jobs with \"pin\": true stay")
    sub.set_defaults(handler=cmd_move)


def build_legacy_parser(prog: str = "scripts-coordinator") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog, formatter_class=formatter,
        description="Drop-in for the original coordinator: validate the jobs file, publish it\n"
                    "to the per-node queues, follow it with live progress, collect, print the\n"
                    "summary. Needs workers running (coordinator cluster up, or coordinator\n"
                    "worker --node NAME on each node), or use coordinator local to run\n"
                    "everything on this machine. With a cluster inventory whose nodes keep\n"
                    "outputs on their own disks, Step 3 inputs are pushed to the nodes first\n"
                    "and every output is fetched home before collecting.",
        epilog="examples:\n"
               "  scripts-coordinator --jobs-file scoring_jobs.json "
               "--output-dir full_scoring_results\n"
               "  scripts-coordinator --jobs-file step5_jobs.json --preserve-paths\n"
               "  scripts-coordinator --jobs-file scoring_jobs.json --dry-run\n\n"
               + exit_table(SUBMIT_EXITS).replace("with --wait: ", "").replace(
                   " (without --wait: the run was published)", "") + "\n\n" + ENVIRONMENT,
    )
    add_original_flags(parser)
    add_retry_flags(parser)
    add_scripts_check_flag(parser)
    parser.add_argument("--broker", metavar="URL", help="Redis URL (default: $SC_BROKER_URL)")
    parser.add_argument("--new-run", action="store_true",
                        help="publish a new run even when a run of the same jobs file, "
                             "options and directory is still under way (by default that run "
                             "is followed: a command killed mid-run picks its run up again)")
    add_follow_flags(parser)
    return parser
