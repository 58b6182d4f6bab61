"""Cluster verbs: ``coordinator cluster init|deploy|up|status|logs|down|unit`` over SSH.

Every verb reads the inventory (``--inventory``, ``$SC_INVENTORY``, or
``./cluster.toml``), acts on the named nodes (all by default) in parallel, and
prints one line per node; the exit status is 6 if any node failed.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator import project_version
from coordinator.broker import broker_url as resolve_broker_url
from coordinator.broker import connect_tracking, publisher, redact
from coordinator.cli.common import (
    PROG,
    CommandFactory,
    add_inventory_flag,
    exit_table,
    formatter,
    require,
)
from coordinator.cluster import inventory_path
from coordinator.errors import BrokerUnreachableError, ExitCode, InvalidJobsError, NodeFailedError
from worker_tasks.spec import queue_for

if TYPE_CHECKING:  # Fabric, pydantic and Redis: imported by the verbs that use them
    from coordinator.cluster.group import NodeOutcome
    from coordinator.cluster.inventory import Inventory
    from coordinator.cluster.remote import RemoteNode
    from coordinator.cluster.workers import WorkerProcess
    from coordinator.cluster_view import ClusterView


def load(args: argparse.Namespace) -> Inventory:
    from coordinator.cluster.inventory import load_inventory

    return load_inventory(inventory_path(args.inventory))


def over_ssh(verb: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A verb that reaches the nodes: Fabric must be installed (a worker-only install lacks
    it), checked before the verb imports anything of it."""
    @functools.wraps(verb)
    def checked(args: argparse.Namespace) -> int:
        require(["fabric", "paramiko"], "head", "the cluster verbs")
        return verb(args)

    return checked


def report(outcomes: list[NodeOutcome], verb: str) -> int:
    """One line per node; exit 6 naming the failed nodes if any failed."""
    width = max((len(outcome.label) for outcome in outcomes), default=8) + 2
    for outcome in outcomes:
        print(outcome.line(width), flush=True)
    failed = [outcome.label for outcome in outcomes if not outcome.ok]
    if failed:
        raise NodeFailedError(f"cluster {verb}: {len(failed)} of {len(outcomes)} nodes failed "
                              f"({', '.join(failed)})")
    return ExitCode.OK


def on_nodes(args: argparse.Namespace, verb: str,
             action: Callable[[RemoteNode], str | tuple[str, object]]) -> int:
    from coordinator.cluster.group import Cluster

    with Cluster(load(args), args.nodes) as cluster:
        return report(cluster.each(action), verb)


def cmd_init(args: argparse.Namespace) -> int:
    from coordinator.cluster.inventory import EXAMPLE
    from worker_tasks import signing

    sys.stdout.write(EXAMPLE)
    if signing.unsigned():
        print(f"{PROG}: no signing key made ({signing.UNSIGNED_VARIABLE}=1)", file=sys.stderr)
        return ExitCode.OK
    key, cert, made = signing.ensure_head_key()
    what = "made" if made else "kept"
    print(f"{PROG}: {what} the head node's signing key {key} (mode 0600, never copied "
          f"anywhere) and its certificate {cert} (cluster deploy installs it on the nodes)",
          file=sys.stderr)
    return ExitCode.OK


@over_ssh
def cmd_deploy(args: argparse.Namespace) -> int:
    from coordinator.cluster import deploy
    from coordinator.cluster.group import Cluster
    from worker_tasks.connections import CA_VARIABLE
    from worker_tasks.signing import signing_files
    inventory = load(args)
    scripts = None
    if not args.no_scripts:
        scripts, skipped = deploy.scripts_files(Path(args.scripts_dir), args.exclude,
                                                inventory_path(args.inventory))
        for line in skipped:
            print(f"scripts: {line}", flush=True)
        if not scripts:
            if args.project is None and not args.data:
                raise InvalidJobsError(f"--scripts-dir {args.scripts_dir}: no files to deploy")
            print(f"scripts: none in {args.scripts_dir}; deploying only the "
                  f"{'project' if args.project is not None else 'data'}", flush=True)
            scripts = None
    data = deploy.data_files(args.data, Path.cwd()) if args.data else None
    signed = signing_files()
    cert = Path(signed[1]) if signed else None
    redis_ca = Path(os.environ[CA_VARIABLE]) if os.environ.get(CA_VARIABLE) else None
    with deploy.with_workdir() as scratch:
        wheel = (deploy.project_wheel(args.project or None, Path(scratch))
                 if args.project is not None else None)

        def one(remote: RemoteNode) -> str:
            done = []
            if wheel is not None:
                done.append(deploy.install_project(remote, wheel))
            if cert is not None:
                done.append(deploy.deploy_trust(remote, cert))
            if redis_ca is not None:
                done.append(deploy.deploy_redis_ca(remote, redis_ca))
            if scripts is not None:
                done.append(deploy.deploy_scripts(remote, scripts))
            if data is not None:
                done.append(deploy.deploy_data(remote, data))
            return "; ".join(done)

        with Cluster(inventory, args.nodes) as cluster:
            return report(cluster.each(one), "deploy")


@over_ssh
def cmd_up(args: argparse.Namespace) -> int:
    from coordinator.cluster.workers import RemoteWorker

    head_broker = resolve_broker_url(args.broker)
    return on_nodes(args, "up",
                    lambda remote: RemoteWorker(remote, head_broker).start(args.per_gpu))


@over_ssh
def cmd_down(args: argparse.Namespace) -> int:
    from coordinator.cluster.workers import RemoteWorker

    return on_nodes(args, "down", lambda remote: RemoteWorker(remote).close(
        args.now, args.timeout, args.purge))


@over_ssh
def cmd_logs(args: argparse.Namespace) -> int:
    from coordinator.cluster.group import Cluster
    from coordinator.cluster.workers import RemoteWorker

    with Cluster(load(args), args.nodes) as cluster:
        outcomes = cluster.each(lambda remote: ("", RemoteWorker(remote).logs(args.lines)))
    for outcome in outcomes:
        if len(outcomes) > 1:
            print(f"==> {outcome.label} <==")
        if outcome.ok:
            sys.stdout.write(outcome.value)
        else:
            print(outcome.line())
    failed = [outcome.label for outcome in outcomes if not outcome.ok]
    if failed:
        raise NodeFailedError(f"cluster logs: could not read the log of {', '.join(failed)}")
    return ExitCode.OK


@over_ssh
def cmd_unit(args: argparse.Namespace) -> int:
    from coordinator.cluster import workers

    for node in load(args).select(args.nodes):
        sys.stdout.write(workers.systemd_unit(node, args.per_gpu))
    return ExitCode.OK


def broker_view(broker: str | None) -> tuple[ClusterView | None, str | None]:
    """The cluster as the head node's broker sees it, asked once; or why it cannot be seen."""
    import redis

    from coordinator.cluster_view import OPERATOR_INSPECT_TIMEOUT_S, ClusterView
    from worker_tasks.connections import redis_client

    url = resolve_broker_url(broker)
    try:
        view = ClusterView(connect_tracking(None, broker), publisher(broker),
                           timeout=OPERATOR_INSPECT_TIMEOUT_S,
                           broker=redis_client(url, socket_connect_timeout=3, socket_timeout=5))
        if view.answering():
            view.active()
    except (BrokerUnreachableError, redis.RedisError, OSError) as err:
        return None, f"broker {redact(url)} unreachable from here: {err}"
    return view, None


def signing_status() -> str:
    from worker_tasks.signing import SigningError, status_line

    try:
        return status_line()
    except SigningError as err:
        return str(err)


def broker_lines(broker: str | None) -> list[str]:
    """Which Redis the broker is now (behind Sentinels: the master they name) and how far
    its replicas lag."""
    import redis

    from worker_tasks.connections import Replication, redis_client

    url = resolve_broker_url(broker)
    try:
        return Replication.of(redis_client(url, socket_connect_timeout=3,
                                           socket_timeout=5)).lines()
    except (redis.RedisError, OSError) as err:
        return [f"{redact(url)}: replication unknown ({err})"]


@over_ssh
def cmd_status(args: argparse.Namespace) -> int:
    from coordinator.cluster.group import Cluster
    from coordinator.cluster.remote import NodeError
    from coordinator.cluster.workers import RemoteWorker

    inventory = load(args)
    view, broker_error = broker_view(args.broker)
    if view is not None:
        print("\n".join(f"broker: {line}" for line in broker_lines(args.broker)), flush=True)
    print(f"signing: {signing_status()}", flush=True)
    head_version = project_version()

    def one(remote: RemoteNode) -> str:
        state = RemoteWorker(remote).state()
        parts, problems = [], []
        several = len(state.workers) > 1
        for worker in state.workers:
            seen, trouble = worker_parts(worker, view, queue_for(worker.slot))
            where = f"{worker.slot.removeprefix(remote.label + '.')}: " if several else ""
            parts.append(where + ", ".join(seen))
            problems += [f"{where}{problem}" for problem in trouble]
        if state.engine:
            parts.append(f"engine {state.engine}")
        if state.version != head_version:
            parts.append(f"version {state.version} (head has {head_version}: "
                         f"cluster deploy --project)")
        line = "ssh ok, " + "; ".join(parts)
        if problems:
            raise NodeError(line)
        return line

    with Cluster(inventory, args.nodes) as cluster:
        outcomes = cluster.each(one)
    if broker_error:
        print(broker_error, file=sys.stderr)
    code = report(outcomes, "status")
    if broker_error:
        raise BrokerUnreachableError(broker_error)
    return code


def worker_parts(worker: WorkerProcess, view: ClusterView | None,
                 queue: str) -> tuple[list[str], list[str]]:
    """What ``cluster status`` says of one worker of a node, and what is wrong with it."""
    parts, problems = [], []
    if worker.alive:
        parts.append(f"worker pid {worker.pid} alive")
    else:
        stale = f" (stale pid file, pid {worker.pid})" if worker.stale else ""
        parts.append(f"no worker running{stale}")
        problems.append("no worker")
    name = worker.worker_name
    if view is not None:
        ping = name in view.answering()
        parts.append("ping ok" if ping else "no ping answer")
        if not ping:
            problems.append("no ping")
        parts.append(f"queue {view.queue_length(queue)}")
        job = view.current_job(name)
        parts.append(f"running {job}" if job else "idle")
    return parts, problems


CLUSTER_EXITS = (
    (ExitCode.OK, "every named node did its part"),
    (ExitCode.INVALID_INPUT, "a bad inventory or flags; the cluster verbs need Fabric "
                             "(scripts-coordinator[head])"),
    (ExitCode.BROKER_UNREACHABLE, "up, status: Redis unreachable from the head node"),
    (ExitCode.CLUSTER_FAILED, "a node failed (one line per node says which and why)"))


def register(command: CommandFactory) -> None:
    cluster = command(
        "cluster", "drive the GPU nodes of an inventory over SSH (Fabric)",
        "coordinator cluster init > cluster.toml && coordinator cluster deploy && "
        "coordinator cluster up", CLUSTER_EXITS)
    verbs = cluster.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str, examples: str,
             nodes: str = "*") -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text, description=help_text,
                               epilog=f"examples:\n{examples}\n\n{exit_table(CLUSTER_EXITS)}",
                               formatter_class=formatter)
        if nodes == "*":
            sub.add_argument("nodes", nargs="*", metavar="NODE",
                             help="act on these node labels only (default: every node)")
        elif nodes == "+":
            sub.add_argument("nodes", nargs="+", metavar="NODE", help="node labels")
        add_inventory_flag(sub, "the inventory (default: $SC_INVENTORY, else ./cluster.toml)")
        sub.add_argument("--broker", metavar="URL", default=argparse.SUPPRESS,
                         help="Redis URL as the head node reaches it (default: $SC_BROKER_URL)")
        return sub

    sub = verb("init", "print a commented example inventory to edit",
               "  coordinator cluster init > cluster.toml", nodes="")
    sub.set_defaults(handler=cmd_init)

    sub = verb("deploy", "copy the scripts directory (and data, and the project) to the nodes; "
                         "only changed files move",
               "  coordinator cluster deploy --scripts-dir /opt/pipeline\n"
               "  coordinator cluster deploy rig-b --data scoring_chunks --data "
               "train_history.json\n"
               "  coordinator cluster deploy --project            # build a wheel here, "
               "install it there")
    sub.add_argument("--scripts-dir", default=".", metavar="DIR",
                     help="the head node's scripts directory, copied to each node's "
                          "scripts_dir (default: .); never its inventory, keys, outputs or "
                          "Step 3 data (each kind left out is named)")
    sub.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                     help="leave out matching files or directories (repeatable; hidden "
                          "files, __pycache__ and *.pyc always are)")
    sub.add_argument("--no-scripts", action="store_true", help="do not copy the scripts")
    sub.add_argument("--data", action="append", default=[], metavar="PATH",
                     help="a file or directory under the current directory, copied to the same "
                          "relative path under each node's workdir (repeatable)")
    sub.add_argument("--project", nargs="?", const="", metavar="WHEEL",
                     help="install scripts-coordinator on the nodes with their configured "
                          "python: WHEEL, or a wheel built from this source tree")
    sub.set_defaults(handler=cmd_deploy)

    sub = verb("up", "start one detached worker per node, or per GPU (idempotent; replaces "
                     "stale pid files)",
               "  coordinator cluster up\n  coordinator cluster up rig-b rig-c\n"
               "  coordinator cluster up --per-gpu    # for runs submitted with --per-gpu")
    sub.add_argument("--per-gpu", action="store_true",
                     help="one worker per GPU of each node (its inventory 'gpus'; queues "
                          "node.NODE.gpuK), for runs submitted with --per-gpu: a node with "
                          "gpus = 2 then runs two jobs at once, one per GPU. Without it one "
                          "worker per node runs one job at a time (jobs that use every GPU)")
    sub.set_defaults(handler=cmd_up)

    sub = verb("status", "per node: SSH, each worker's pid, Celery ping, queue length and "
                         "current job; the scoring engine it can use; its version",
               "  coordinator cluster status")
    sub.set_defaults(handler=cmd_status)

    sub = verb("logs", "print the tail of nodes' worker logs",
               "  coordinator cluster logs rig-a --lines 50", nodes="+")
    sub.add_argument("--lines", type=int, default=50, metavar="N",
                     help="how many lines (default: 50)")
    sub.set_defaults(handler=cmd_logs)

    sub = verb("down", "stop the workers that up started (per node or per GPU): warm (the "
                       "running job finishes and writes its .done) or --now",
               "  coordinator cluster down\n  coordinator cluster down rig-c --now")
    sub.add_argument("--now", action="store_true",
                     help="kill each worker and its running job at once (no .done is written; "
                          "the job runs again when a worker serves the node)")
    sub.add_argument("--timeout", type=float, default=600.0, metavar="S",
                     help="how long a warm stop may wait for the running job (default: "
                          "%(default)s)")
    sub.add_argument("--purge", action="store_true",
                     help="also remove the env file up wrote on the node (it holds the broker "
                          "URL with its password); without it the file stays for the next up")
    sub.set_defaults(handler=cmd_down)

    sub = verb("unit", "print a systemd unit that runs a node's worker",
               "  coordinator cluster unit rig-a | ssh rig-a 'sudo tee "
               "/etc/systemd/system/scripts-coordinator-worker-rig-a.service'\n"
               "  coordinator cluster unit rig-a --per-gpu   # a template: "
               "scripts-coordinator-worker-rig-a@0, @1, ...", nodes="+")
    sub.add_argument("--per-gpu", action="store_true",
                     help="a template unit (NAME@.service) whose instance is the GPU index, "
                          "as cluster up --per-gpu starts them")
    sub.set_defaults(handler=cmd_unit)
