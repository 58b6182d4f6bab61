"""Node verbs: ``worker`` (this machine's worker for one node) and ``local`` (a whole cluster here).

``coordinator worker`` has four modes: in the foreground (default; the Celery
worker replaces this process), ``--detach`` (in a session of its own, with a
pid file and a log file; what ``cluster up`` runs over SSH), ``--stop`` and
``--status`` (what ``cluster down`` and ``cluster status`` run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator import project_version
from coordinator.cli.common import PROG, CommandFactory, add_warm_flags, existing_dir
from coordinator.cli.runs import (
    add_original_flags,
    add_retry_flags,
    follow,
    notice,
    prepare_args,
    print_plan,
)
from coordinator.errors import ExitCode, InvalidJobsError
from coordinator.options import DEFAULTS

if TYPE_CHECKING:  # the verbs import these when they run: --help stays quick
    from coordinator.plan import Plan


def cmd_worker(args: argparse.Namespace) -> int:
    from coordinator.node_worker import NodeWorker, load_env_file

    worker = NodeWorker(args.node, args.gpu, Path(args.workdir),
                        Path(args.pidfile) if args.pidfile else None,
                        Path(args.logfile) if args.logfile else None)
    if args.env_file:
        load_env_file(args.env_file)
    if args.make_key:
        key, cert, made = worker.make_key()
        print(f"{PROG}: node key {'made' if made else 'kept'}: {key}", file=sys.stderr)
        sys.stdout.write(cert.read_text())
        return ExitCode.OK
    if args.status:
        print(json.dumps(worker.status(project_version())))
        return ExitCode.OK
    if args.stop:
        print("\n".join(worker.stop(now=args.now, timeout=args.timeout)))
        return ExitCode.OK
    pidfile, logfile = worker.files()
    current = worker.running()
    if current.alive:
        if args.detach:
            print(f"already running (pid {current.pid}, log {logfile})")
            return ExitCode.OK
        raise InvalidJobsError(f"node {worker.slot}: a worker is already running (pid "
                               f"{current.pid}, pid file {pidfile})")
    note = f"; replaced stale pid file (pid {current.pid} gone)" if current.stale else ""
    worker.check_trust(args.trusted_certs, args.require_signed)
    worker.check_alone(args.broker, args.force)
    os.environ.update(worker.environment(args.broker, Path(args.scripts_dir), warm_env(args)))
    command = worker.command(args.loglevel)
    if args.detach:
        print(worker.start_detached(command, args.broker) + note)
        return ExitCode.OK
    print(f"{PROG}: starting worker for node {worker.slot}: {' '.join(command[1:])}",
          file=sys.stderr, flush=True)
    worker.exec_here(command)  # the worker replaces this process: signals go to it
    return ExitCode.OK  # not reached


def cmd_local(args: argparse.Namespace) -> int:
    """A private Redis and a worker per slot of the plan, the run followed, all stopped; or
    (``--up``, ``--status``, ``--down``) a local cluster that stays up."""
    from coordinator import local

    if args.serve:  # the supervisor ``--up`` starts (not for people)
        return local.serve(local.node_list(args.nodes), Path(args.scripts_dir), Path(args.workdir),
                           warm_env(args))
    if args.up:
        cluster = local.keep_up(local.node_list(args.nodes), Path(args.scripts_dir).resolve(),
                                Path(args.workdir).resolve(), warm=not args.cold)
        print("\n".join(["local cluster up:", *(f"  {line}" for line in cluster.lines())]))
        return ExitCode.OK
    if args.down:
        print(local.take_down())
        return ExitCode.OK
    if args.status:
        cluster = local.standing_cluster()
        if cluster is None:
            print("no local cluster is up (coordinator local --up starts one)")
            return ExitCode.CLUSTER_FAILED
        print("\n".join(["local cluster up:", *(f"  {line}" for line in cluster.lines())]))
        return ExitCode.OK
    if not args.jobs_file:
        raise InvalidJobsError("local: give --jobs-file FILE (or --up, --status, --down)")
    plan = prepare_args(args)
    if args.dry_run:
        print_plan(plan)
        return ExitCode.OK
    up = local.standing_cluster()
    if up is not None:  # submit to the cluster that stays up, and follow the run there
        from coordinator.run import publish

        run = publish(plan, broker_url=up.broker_url, notice=notice)
        print(f"run {run.id}: {len(plan.specs)} jobs published to the local cluster that is up "
              f"({up.broker_url})", file=sys.stderr, flush=True)
        return follow(run, args)
    return run_local(plan, Path(args.scripts_dir), args.nodes, warm_env(args), args)


def run_local(plan: Plan, scripts_dir: Path, nodes: str | None, worker_env: dict[str, str],
              following: argparse.Namespace) -> int:
    """Run ``plan`` on a throwaway local cluster (``local``, ``demo``): its exit status.

    ``nodes``: extra nodes to start a worker for (``--nodes``); ``following``: how the run is
    followed and collected (``--timeout``, ``--workdir``, ``--failover``, ``--joblog``).
    """
    from coordinator.local import LocalCluster, slots_for, unsigned
    from coordinator.run import publish

    slots = slots_for(plan, nodes)  # nodes, or each node's GPUs
    print(f"local cluster: private Redis and {len(slots)} workers ({', '.join(slots)})",
          file=sys.stderr, flush=True)
    log_dir = plan.options.workdir / plan.output_dir / "logs"
    try:
        with LocalCluster(slots, str(scripts_dir), plan.options.workdir, log_dir=log_dir,
                          extra_env=worker_env, die_with_parent=True,
                          signed=not unsigned()) as cluster:
            # Signed with the cluster's throwaway key, so signing runs on every local run;
            # the key is this cluster's, for as long as it runs.
            with environment(cluster.head_env()):
                run = publish(plan, broker_url=cluster.broker_url)
                print(f"run {run.id}: {len(plan.specs)} jobs published", file=sys.stderr,
                      flush=True)
                code = follow(run, following, detached=False)
            cluster.stop(now=True)  # every job is final: the workers are idle
            return code
    except KeyboardInterrupt:
        print(f"{PROG}: stopped the local cluster: its Redis, workers and running jobs",
              file=sys.stderr)
        raise


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` set in this process's environment while the block runs, then as before."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def warm_env(args: argparse.Namespace) -> dict[str, str]:
    """The workers' environment: warm (``--preload``) unless ``--cold``."""
    if args.preload is not None and args.cold:
        raise InvalidJobsError("--preload: not with --cold (it says what the warm parent "
                               "imports)")
    from coordinator.local import warm_env as worker_settings

    return {} if args.cold else worker_settings(args.preload)


def add_place_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scripts-dir", default=".", metavar="DIR", type=existing_dir,
                        help="where job scripts are looked up (default: current directory)")
    parser.add_argument("--workdir", default=str(DEFAULTS.workdir), metavar="DIR",
                        type=existing_dir, help="where scripts run and relative paths resolve "
                                                "(default: %(default)s)")


WORKER_EXITS = (
    (ExitCode.OK, "--detach: started and answering a ping; --stop: stopped; --status: printed; "
                  "in the foreground: the worker stopped"),
    (ExitCode.INVALID_INPUT, "a worker already serves the node (--force starts one anyway), or "
                             "bad flags"),
    ExitCode.BROKER_UNREACHABLE,
    (ExitCode.CLUSTER_FAILED, "--detach: the worker died or did not answer at start; --stop: it "
                              "did not stop within --timeout"))
LOCAL_EXITS = (
    (ExitCode.OK, "every job succeeded (--up, --down: done; --status: a cluster is up)"),
    ExitCode.JOBS_FAILED,
    (ExitCode.WAIT_TIMEOUT, "--timeout passed first; everything was stopped"),
    (ExitCode.CLUSTER_FAILED, "its Redis or a worker could not start, or died (--status: no "
                              "local cluster is up)"))


def register(command: CommandFactory) -> None:
    sub = command("worker", "run this machine's Celery worker for one node (queue node.NAME)",
                  "coordinator worker --node rig-a --scripts-dir /opt/pipeline --workdir /data\n"
                  "  coordinator worker --node rig-a --workdir /data --detach   # in the "
                  "background\n"
                  "  coordinator worker --node rig-a --workdir /data --stop     # warm stop\n"
                  "  coordinator worker --node rig-a --workdir /data --status   # JSON\n"
                  "  coordinator worker --node rig-a --workdir /data --make-key > rig-a.crt"
                  "  # the node's own key",
                  WORKER_EXITS)
    sub.add_argument("--node", required=True, help="the node label jobs name, e.g. rig-a")
    sub.add_argument("--gpu", type=int, metavar="K",
                     help="per-GPU mode: serve only GPU K of the node (queue node.NODE.gpuK); "
                          "start one such worker per GPU, for runs submitted with --per-gpu")
    add_place_flags(sub)
    add_warm_flags(sub)
    sub.add_argument("--loglevel", default="INFO", help="Celery log level (default: INFO)")
    sub.add_argument("--force", action="store_true",
                     help="start even if another worker already serves this node")
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument("--detach", action="store_true",
                      help="run in the background (own session, survives the shell or SSH "
                           "connection); returns once the worker answers a ping")
    mode.add_argument("--stop", action="store_true",
                      help="stop the worker of --pidfile: warm (its running job finishes "
                           "first), or at once with --now")
    mode.add_argument("--status", action="store_true",
                      help="print the worker's pid file state as JSON (pid, alive, stale)")
    mode.add_argument("--make-key", action="store_true",
                      help="make this node's own key (if it has none) in WORKDIR/"
                           ".scripts-coordinator/keys and print its certificate: the worker "
                           "signs its control replies with it (cluster up runs this)")
    sub.add_argument("--now", action="store_true",
                     help="with --stop: kill the worker and its running job at once")
    sub.add_argument("--timeout", type=float, default=600.0, metavar="S",
                     help="with --stop: how long a warm stop may take (default: %(default)s)")
    sub.add_argument("--pidfile", metavar="FILE",
                     help="pid file (default: WORKDIR/.scripts-coordinator/worker-NODE.pid)")
    sub.add_argument("--logfile", metavar="FILE",
                     help="log file; with --detach the default is "
                          "WORKDIR/.scripts-coordinator/worker-NODE.log")
    sub.add_argument("--env-file", metavar="FILE",
                     help="NAME=VALUE lines loaded first (SC_BROKER_URL, ...); keeps a broker "
                          "password off the command line")
    sub.add_argument("--trusted-certs", metavar="DIR",
                     help="run only jobs signed by a key whose certificate is in DIR "
                          "($SC_TRUSTED_CERTS); every other message is refused in one line")
    sub.add_argument("--require-signed", action="store_true",
                     help="refuse to start without --trusted-certs ($SC_REQUIRE_SIGNED=1)")
    sub.set_defaults(handler=cmd_worker)

    sub = command("local", "run a jobs file on this machine (private Redis, one worker per "
                           "node), or keep a local cluster up for other commands (--up)",
                  "coordinator examples . && coordinator local --jobs-file "
                  "examples/hello_jobs.json --output-dir out\n"
                  "  coordinator local --up && python3 my_step.py && coordinator local --down",
                  LOCAL_EXITS)
    add_original_flags(sub)
    add_retry_flags(sub)
    add_place_flags(sub)
    add_warm_flags(sub)
    sub.add_argument("--timeout", type=float, metavar="S",
                     help="give up waiting after S seconds (exit 5); everything is stopped")
    sub.add_argument("--joblog", metavar="FILE",
                     help="GNU parallel's joblog format (default: OUTPUT_DIR/joblog)")
    sub.add_argument("--nodes", metavar="NODE[,NODE...]",
                     help="also start workers for these nodes (or GPU slots, rig-a.gpu1), "
                          "beside those the jobs file names: floating jobs run on all of them; "
                          "with --up: the nodes of the cluster (default: rig-a,rig-b)")
    stays = sub.add_mutually_exclusive_group()
    stays.add_argument("--up", action="store_true",
                       help="start a local cluster that stays up (private Redis, a worker per "
                            "--nodes, Flower) in the background and return; while it is up, "
                            "every command and the Python API here use it when no broker is "
                            "named, and local --jobs-file submits to it")
    stays.add_argument("--status", action="store_true",
                       help="say whether the local cluster is up, and where each part is")
    stays.add_argument("--down", action="store_true",
                       help="stop the local cluster and all it started (no process, no "
                            "directory left)")
    stays.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    for action in sub._actions:  # noqa: SLF001 (--up/--status/--down need no jobs file)
        if "--jobs-file" in action.option_strings:
            action.required = False
    sub.set_defaults(handler=cmd_local)
