"""Command line: ``coordinator <command>`` and the drop-in ``scripts-coordinator``.

Every failure prints one line, ``coordinator: error: ...``, and exits with a
status from ``coordinator.errors.ExitCode``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import redis

from coordinator.broker import broker_url as resolve_broker_url
from coordinator.broker import check_broker, connect_tracking, publisher
from coordinator.collector import collect, render
from coordinator.errors import CoordinatorError, ExitCode, InvalidJobsError, RunNotFoundError
from coordinator.jobs import SAFE_NAME
from coordinator.plan import Plan
from coordinator.progress import ProgressDisplay
from coordinator.run import Run, RunStatus
from coordinator.submit import (
    DEFAULT_CHUNK_DIR,
    DEFAULT_OUTPUT_DIR,
    get_run,
    latest_run_id,
    prepare,
    submit,
)
from coordinator.workers import unserved_nodes, workers_by_node
from worker_tasks.tracking import JobState, runs_key

PROG = "coordinator"

EXIT_CODES = """\
exit status:
  0  every job succeeded (or, for submit without --wait, the run was published)
  1  at least one job failed
  2  invalid input (jobs file, flags); nothing was published
  3  Redis unreachable
  4  unknown run id
  5  --timeout passed before the run finished
  6  the local cluster could not start
  130 interrupted (Ctrl-C)"""

ENVIRONMENT = """\
environment:
  SC_BROKER_URL      Redis broker (default redis://127.0.0.1:6379/0); --broker overrides it
  SC_TRACKING_URL    Redis holding run records (default: the broker)
  SC_CONNECT_TIMEOUT seconds before Redis counts as unreachable (default 3)"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like invalid input."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.INVALID_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30)


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


def add_collect_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=".", metavar="DIR",
                        help="where the output directory is, as the workers see it, for "
                             "collecting (default: .)")


def add_follow_flags(parser: argparse.ArgumentParser, workdir: bool = True) -> None:
    """Flags of every command that follows a run to its end and collects it."""
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="give up waiting after S seconds (exit 5; the run goes on)")
    if workdir:
        add_collect_flags(parser)


def add_run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", nargs="?", metavar="RUN",
                        help="run id printed by submit (default: the newest run)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, formatter_class=formatter,
        description="Fan GPU script jobs out over per-node Celery queues; success is a "
                    ".done file.",
        epilog="examples:\n"
               "  coordinator local --jobs-file examples/hello_jobs.json   # all on this machine\n"
               "  coordinator worker --node rig-a                          # on each GPU node\n"
               "  coordinator submit --jobs-file scoring_jobs.json --wait   # from the head node\n"
               "  coordinator status                                        # newest run\n"
               "  coordinator retry --wait                                  # failed jobs again\n"
               "  coordinator COMMAND --help                                # each command\n\n"
               + EXIT_CODES + "\n\n" + ENVIRONMENT,
    )
    parser.add_argument("--broker", metavar="URL",
                        help="Redis URL of the broker (default: $SC_BROKER_URL or local)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # --broker is accepted after the command too (`coordinator status RUN --broker URL`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", metavar="URL", default=argparse.SUPPRESS,
                        help="Redis URL of the broker (default: $SC_BROKER_URL or local)")

    def command(name: str, help_text: str, example: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text,
                                   epilog=f"example:\n  {example}\n\n{EXIT_CODES}",
                                   formatter_class=formatter, parents=[common])

    sub = command("submit", "validate a jobs file and publish it; prints the run id",
                  "coordinator submit --jobs-file scoring_jobs.json --output-dir results --wait")
    add_original_flags(sub)
    sub.add_argument("--wait", action="store_true",
                     help="follow the run with progress, then collect (like scripts-coordinator)")
    add_follow_flags(sub)
    sub.add_argument("--json", action="store_true", help="print the run id as JSON")
    sub.set_defaults(handler=cmd_submit)

    sub = command("status", "show a run's jobs and their states",
                  "coordinator status 20261129-081500-3f9a1c --json")
    add_run_arg(sub)
    sub.add_argument("--json", action="store_true", help="machine-readable output")
    sub.set_defaults(handler=cmd_status)

    sub = command("runs", "list the newest runs with their progress",
                  "coordinator runs --limit 5")
    sub.add_argument("--limit", type=int, default=10, help="how many runs (default: 10)")
    sub.set_defaults(handler=cmd_runs)

    sub = command("wait", "follow a run with a live progress display until every job is final",
                  "coordinator wait 20261129-081500-3f9a1c --timeout 900")
    add_run_arg(sub)
    add_follow_flags(sub)
    sub.set_defaults(handler=cmd_wait)

    sub = command("collect", "write run_summary.json (and merged outputs) and print the table",
                  "coordinator collect 20261129-081500-3f9a1c")
    add_run_arg(sub)
    add_collect_flags(sub)
    sub.set_defaults(handler=cmd_collect)

    sub = command("cancel", "drop a run's queued jobs and terminate its running ones",
                  "coordinator cancel 20261129-081500-3f9a1c")
    add_run_arg(sub)
    sub.set_defaults(handler=cmd_cancel)

    sub = command("retry", "publish a run's failed and cancelled jobs again",
                  "coordinator retry 20261129-081500-3f9a1c --wait")
    add_run_arg(sub)
    sub.add_argument("--wait", action="store_true", help="follow the run, then collect")
    add_follow_flags(sub)
    sub.set_defaults(handler=cmd_retry)

    sub = command("worker", "run this machine's Celery worker for one node (queue node.NAME)",
                  "coordinator worker --node rig-a --scripts-dir /opt/pipeline --workdir /data")
    sub.add_argument("--node", required=True, help="the node label jobs name, e.g. rig-a")
    add_place_flags(sub)
    sub.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO)")
    sub.add_argument("--force", action="store_true",
                     help="start even if another worker already serves this node")
    sub.set_defaults(handler=cmd_worker)

    sub = command("local", "run a jobs file on this machine: private Redis, one worker per node",
                  "coordinator local --jobs-file examples/hello_jobs.json --output-dir out")
    add_original_flags(sub)
    add_place_flags(sub)
    add_follow_flags(sub, workdir=False)
    sub.set_defaults(handler=cmd_local)

    jobs = command("jobs", "write jobs files for a workload",
                   "coordinator jobs scoring --help")
    kinds = jobs.add_subparsers(dest="kind", metavar="KIND", required=True)
    sub = kinds.add_parser(
        "scoring", formatter_class=formatter,
        help="Step 3: split survivors into chunk jobs over the nodes' GPUs",
        description="Split a survivors file into chunk files and write a jobs file in the "
                    "original format, dealt evenly over the nodes' GPUs.",
        epilog="example:\n  coordinator jobs scoring --survivors survivors.json "
               "--train-history train_history.json \\\n      --nodes rig-a,rig-b:2 --chunks 36 "
               "--prng-type java_lcg --mod 1000 \\\n      --jobs-file scoring_jobs.json "
               "--chunk-dir scoring_chunks")
    sub.add_argument("--survivors", required=True, help="JSON list of seeds or survivor objects")
    sub.add_argument("--train-history", required=True,
                     help="history path, as the workers will see it (relative to their workdir)")
    sub.add_argument("--nodes", required=True,
                     help="comma-separated nodes; NAME:K for a node with K GPUs")
    sub.add_argument("--chunks", type=int, default=36, help="number of jobs (default: 36)")
    sub.add_argument("--prng-type", required=True)
    sub.add_argument("--mod", type=int, required=True)
    sub.add_argument("--skip", type=int, default=0)
    sub.add_argument("--jobs-file", default="scoring_jobs.json")
    sub.add_argument("--chunk-dir", default=DEFAULT_CHUNK_DIR)
    sub.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    sub.set_defaults(handler=cmd_jobs_scoring)

    sub = command("demo-data", "write a synthetic draw history from a secret seed, and survivors",
                  "coordinator demo-data --out-dir demo --candidates 1000000 --prng-type java_lcg "
                  "--mod 1000")
    sub.add_argument("--out-dir", default="demo", help="where the files go (default: demo)")
    sub.add_argument("--candidates", type=int, default=1_000_000,
                     help="number of candidate seeds, the secret one included (default: 1000000)")
    sub.add_argument("--draws", type=int, default=100, help="history length (default: 100)")
    sub.add_argument("--prng-type", default="java_lcg")
    sub.add_argument("--mod", type=int, default=1000)
    sub.add_argument("--secret-seed", type=int, help="default: a random one")
    sub.add_argument("--rng-seed", type=int, default=2026, help="makes the data reproducible")
    sub.set_defaults(handler=cmd_demo_data)
    return parser


def existing_dir(value: str) -> str:
    """An argparse type: the directory must exist (exit 2 otherwise)."""
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is not a directory")
    return value


def add_place_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scripts-dir", default=".", metavar="DIR", type=existing_dir,
                        help="where job scripts are looked up (default: current directory)")
    parser.add_argument("--workdir", default=".", metavar="DIR", type=existing_dir,
                        help="where scripts run and relative paths resolve (default: .)")


def resolve_run(args: argparse.Namespace) -> Run:
    if args.run_id:
        return get_run(args.run_id, args.broker)
    client = connect_tracking(None, args.broker)
    newest = latest_run_id(client)
    if newest is None:
        raise RunNotFoundError("no runs recorded in this Redis yet")
    return get_run(newest, args.broker)


def follow(run: Run, timeout: float | None, workdir: str | Path, detached: bool = True) -> int:
    """Wait with progress, collect, print the table; the exit status of the run.

    ``detached``: the run lives on a cluster that outlives this command (not ``local``).
    """
    try:
        with ProgressDisplay() as progress:
            run.wait(timeout=timeout, on_progress=progress)
    except KeyboardInterrupt:
        if detached:
            print(f"{PROG}: stopped following run {run.id}; it goes on without this command "
                  f"(coordinator wait {run.id} / coordinator cancel {run.id})", file=sys.stderr)
        raise
    collection = collect(run, workdir=workdir)
    print(render(collection), flush=True)
    return ExitCode.OK if collection.all_succeeded else ExitCode.JOBS_FAILED


def print_plan(args: argparse.Namespace) -> None:
    plan, conversions = prepare(args.jobs_file, args.output_dir, args.preserve_paths,
                                args.chunk_dir)
    for conversion in conversions:
        print(conversion.note)
    print(plan.describe())
    print("dry run: nothing published")


def cmd_submit(args: argparse.Namespace) -> int:
    if args.dry_run:
        print_plan(args)
        return ExitCode.OK
    run = submit(args.jobs_file, args.output_dir, args.preserve_paths, args.broker,
                 chunk_dir=args.chunk_dir)
    status = run.status()
    print(json.dumps({"run_id": run.id}) if args.json else run.id, flush=True)
    print(f"published {status.total} jobs; follow with: coordinator wait {run.id}",
          file=sys.stderr)
    warn_unserved(status, args.broker)
    if args.wait:
        return follow(run, args.timeout, args.workdir)
    return ExitCode.OK


def warn_unserved(status: RunStatus, broker: str | None) -> None:
    """Say which nodes have no worker: their jobs would wait silently otherwise."""
    by_node = status.by_node()
    for node in unserved_nodes(publisher(broker), sorted(by_node)):
        print(f"{PROG}: warning: no worker serves node {node} (queue node.{node}); its "
              f"{len(by_node[node])} jobs wait until one starts: coordinator worker --node {node}",
              file=sys.stderr)


def cmd_runs(args: argparse.Namespace) -> int:
    client = connect_tracking(None, args.broker)
    run_ids = [raw.decode() for raw in client.zrevrange(runs_key(), 0, args.limit - 1)]
    if not run_ids:
        print("no runs recorded in this Redis yet")
    for run_id in run_ids:
        try:
            status = Run(run_id, client).status()
        except RunNotFoundError:  # expired since it was listed
            continue
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.created_at))
        print(f"{run_id}  {created}  {status.state:<10} {status.line()}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    status = resolve_run(args).status()
    if args.json:
        print(json.dumps({"run_id": status.run_id, "state": status.state,
                          "finished": status.finished,
                          "counts": {str(k): v for k, v in status.counts.items()},
                          "jobs": [vars(job) for job in status.jobs]}, default=str, indent=2))
        return ExitCode.OK
    print(f"run {status.run_id} ({status.state}): {status.line()}")
    served = workers_by_node(publisher(args.broker))
    alive = {worker for workers in served.values() for worker in workers}
    for node, jobs in status.by_node().items():
        workers = ", ".join(served.get(node, [])) or "no worker running"
        print(f"  node {node} ({workers}):")
        for job in jobs:
            extra = f" exit {job.exit_code}" if job.exit_code not in (None, 0) else ""
            extra += f" {job.duration_s:.1f} s" if job.duration_s is not None else ""
            if job.error:
                extra += f"  {job.error}"
            if job.state is JobState.RUNNING and job.host not in alive:
                extra += (f"  (its worker {job.host} does not answer: the job runs again once "
                          f"a worker serves {node} and the visibility timeout has passed)")
            print(f"    {job.job_id:<24} {job.state:<10} attempts {job.attempts}{extra}")
    return ExitCode.OK


def cmd_wait(args: argparse.Namespace) -> int:
    return follow(resolve_run(args), args.timeout, args.workdir)


def cmd_collect(args: argparse.Namespace) -> int:
    collection = collect(resolve_run(args), workdir=args.workdir)
    print(render(collection))
    if not collection.summary["finished"]:
        print(f"{PROG}: run {collection.summary['run_id']} is not finished", file=sys.stderr)
    return ExitCode.OK if collection.all_succeeded else ExitCode.JOBS_FAILED


def cmd_cancel(args: argparse.Namespace) -> int:
    run = resolve_run(args)
    print(f"run {run.id}: cancelled {run.cancel()} queued or running jobs")
    return ExitCode.OK


def cmd_retry(args: argparse.Namespace) -> int:
    run = resolve_run(args)
    count = run.retry_failed()
    print(f"run {run.id}: published {count} failed or cancelled jobs again")
    if args.wait and count:
        return follow(run, args.timeout, args.workdir)
    return ExitCode.OK


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    from coordinator.local import worker_command

    if not SAFE_NAME.match(args.node):
        raise InvalidJobsError(f"--node {args.node!r}: use letters, digits, '.', '_', '-'")
    app = publisher(args.broker)
    check_broker(app)
    others = workers_by_node(app).get(args.node, [])
    if others and not args.force:
        raise InvalidJobsError(
            f"node {args.node} is already served by {', '.join(others)}: a second worker would "
            f"run its jobs in parallel (one at a time per node); --force starts it anyway")
    os.environ["SC_BROKER_URL"] = resolve_broker_url(args.broker)
    os.environ["SC_SCRIPTS_DIR"] = str(Path(args.scripts_dir).resolve())
    os.environ["SC_WORKDIR"] = str(Path(args.workdir).resolve())
    command = worker_command(args.node, args.loglevel)
    print(f"{PROG}: starting worker for node {args.node}: {' '.join(command[1:])}",
          file=sys.stderr, flush=True)
    os.chdir(args.workdir)
    os.execv(sys.executable, command)  # the worker replaces this process: signals go to it


def check_scripts_exist(plan: Plan, scripts_dir: Path) -> None:
    """Locally the scripts directory is in sight: refuse a missing script before starting."""
    for index, spec in enumerate(plan.specs):
        if not (scripts_dir / spec.script).is_file():
            raise InvalidJobsError(
                f"jobs: job {index} (job_id {spec.job_id!r}): field 'script': {spec.script!r} "
                f"not found in scripts directory {scripts_dir.resolve()} (see --scripts-dir)")


def cmd_local(args: argparse.Namespace) -> int:
    from coordinator.local import LocalCluster

    if args.dry_run:
        print_plan(args)
        return ExitCode.OK
    workdir = Path(args.workdir)
    plan, _ = prepare(args.jobs_file, args.output_dir, args.preserve_paths, args.chunk_dir)
    check_scripts_exist(plan, Path(args.scripts_dir))
    nodes = sorted(plan.by_node())
    print(f"local cluster: private Redis and {len(nodes)} workers ({', '.join(nodes)})",
          file=sys.stderr, flush=True)
    log_dir = workdir / args.output_dir / "logs"
    try:
        with LocalCluster(nodes, args.scripts_dir, workdir, log_dir=log_dir) as cluster:
            run = submit(Path(args.jobs_file).resolve(), args.output_dir, args.preserve_paths,
                         cluster.broker_url, chunk_dir=args.chunk_dir, workdir=workdir)
            print(f"run {run.id}: {len(plan.specs)} jobs published", file=sys.stderr,
                  flush=True)
            return follow(run, args.timeout, workdir, detached=False)
    except KeyboardInterrupt:
        print(f"{PROG}: stopped the local cluster: its Redis, workers and running jobs",
              file=sys.stderr)
        raise


def cmd_jobs_scoring(args: argparse.Namespace) -> int:
    from coordinator.scoring_jobs import generate_scoring_jobs

    result = generate_scoring_jobs(
        args.survivors, args.train_history, args.nodes, args.chunks, args.prng_type, args.mod,
        args.jobs_file, args.chunk_dir, args.output_dir, args.skip)
    nodes = sorted({job["node"] for job in result.jobs})
    print(f"wrote {len(result.jobs)} jobs over {', '.join(nodes)} to {result.jobs_file}; "
          f"chunks in {args.chunk_dir}/")
    return ExitCode.OK


def cmd_demo_data(args: argparse.Namespace) -> int:
    from coordinator.scoring_jobs import make_demo_data

    demo = make_demo_data(args.out_dir, args.candidates, args.draws, args.prng_type, args.mod,
                          args.secret_seed, args.rng_seed)
    print(f"wrote {demo.history} ({args.draws} draws of {args.prng_type} mod {args.mod} from a "
          f"secret seed) and {demo.survivors} ({args.candidates} candidates); "
          f"the secret is in {demo.secret}")
    return ExitCode.OK


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def run_cli(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace,
            prog: str = PROG) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(handler(args))
    except CoordinatorError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except redis.RedisError as err:  # Redis went away after the first contact
        print(f"{prog}: error: lost the connection to Redis: {err}", file=sys.stderr)
        return int(ExitCode.BROKER_UNREACHABLE)
    except OSError as err:  # a file or directory the command needed; no traceback
        print(f"{prog}: error: {err}", file=sys.stderr)
        return int(ExitCode.JOBS_FAILED)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args.handler, args)


def build_legacy_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="scripts-coordinator", formatter_class=formatter,
        description="Drop-in for the original coordinator: validate the jobs file, publish it\n"
                    "to the per-node queues, follow it with live progress, collect, print the\n"
                    "summary. Needs workers running (coordinator worker --node NAME), or use\n"
                    "coordinator local to run everything on this machine.",
        epilog="example:\n  scripts-coordinator --jobs-file scoring_jobs.json "
               "--output-dir full_scoring_results\n\n" + EXIT_CODES + "\n\n" + ENVIRONMENT,
    )
    add_original_flags(parser)
    parser.add_argument("--broker", metavar="URL", help="Redis URL (default: $SC_BROKER_URL)")
    add_follow_flags(parser)
    return parser


def legacy_main(argv: Sequence[str] | None = None) -> int:
    args = build_legacy_parser().parse_args(argv)
    args.wait, args.json = True, False
    return run_cli(cmd_submit, args, prog="scripts-coordinator")


if __name__ == "__main__":
    sys.exit(main())
