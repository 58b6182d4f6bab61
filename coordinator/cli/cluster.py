"""Cluster verbs: ``coordinator cluster init|deploy|up|status|logs|down|unit`` over SSH.

Every verb reads the inventory (``--inventory``, ``$SC_INVENTORY``, or
``./cluster.toml``), acts on the named nodes (all by default) in parallel, and
prints one line per node; the exit status is 6 if any node failed.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator import project_version
from coordinator.broker import broker_url as resolve_broker_url
from coordinator.cli.common import (
    PROG,
    CommandFactory,
    add_inventory_flag,
    exit_table,
    formatter,
    require,
    speeds_line,
)
from coordinator.cluster import inventory_path
from coordinator.errors import BrokerUnreachableError, ExitCode, NodeFailedError

if TYPE_CHECKING:  # Fabric, pydantic and Redis: imported by the verbs that use them
    from coordinator.cluster import Inventory, NodeOutcome, RemoteNode, WorkerProcess
    from coordinator.cluster_view import ClusterView


def load(args: argparse.Namespace) -> Inventory:
    from coordinator.cluster import load_inventory

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
    from coordinator.cluster import Cluster

    with Cluster(load(args), args.nodes) as cluster:
        return report(cluster.each(action), verb)


def cmd_init(args: argparse.Namespace) -> int:
    from coordinator.cluster import EXAMPLE, UNSIGNED_VARIABLE, head_key

    sys.stdout.write(EXAMPLE)
    made_key = head_key()
    if made_key is None:
        print(f"{PROG}: no signing key made ({UNSIGNED_VARIABLE}=1)", file=sys.stderr)
        return ExitCode.OK
    key, cert, made = made_key
    what = "made" if made else "kept"
    print(f"{PROG}: {what} the head node's signing key {key} (mode 0600, never copied "
          f"anywhere) and its certificate {cert} (cluster deploy installs it on the nodes)",
          file=sys.stderr)
    return ExitCode.OK


@over_ssh
def cmd_deploy(args: argparse.Namespace) -> int:
    from coordinator.broker import redis_ca
    from coordinator.cluster import Cluster, Deployment, head_certificate

    inventory = load(args)
    ca = redis_ca()
    deployment = Deployment(Path(args.scripts_dir), args.exclude, inventory_path(args.inventory),
                            args.data, args.project, args.no_scripts, head_certificate(),
                            Path(ca) if ca else None)
    for line in deployment.notes:
        print(line, flush=True)
    with Cluster(inventory, args.nodes) as cluster:
        return report(deployment.onto(cluster), "deploy")


@over_ssh
def cmd_up(args: argparse.Namespace) -> int:
    from coordinator.cluster import RemoteWorker

    head_broker = resolve_broker_url(args.broker)
    return on_nodes(args, "up",
                    lambda remote: RemoteWorker(remote, head_broker).start(args.per_gpu))


@over_ssh
def cmd_down(args: argparse.Namespace) -> int:
    from coordinator.cluster import RemoteWorker

    return on_nodes(args, "down", lambda remote: RemoteWorker(remote).close(
        args.now, args.timeout, args.purge))


@over_ssh
def cmd_logs(args: argparse.Namespace) -> int:
    from coordinator.cluster import Cluster, RemoteWorker

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
    from coordinator.cluster import systemd_unit

    for node in load(args).select(args.nodes):
        sys.stdout.write(systemd_unit(node, args.per_gpu))
    return ExitCode.OK


@over_ssh
def cmd_status(args: argparse.Namespace) -> int:
    from coordinator.broker import replication_lines
    from coordinator.cluster import Cluster, NodeError, RemoteWorker, trust_line
    from coordinator.cluster_view import ClusterView

    inventory = load(args)
    view, broker_error = ClusterView.for_operator(args.broker)
    if view is not None:
        print("\n".join(f"broker: {line}" for line in replication_lines(args.broker)),
              flush=True)
    print(f"signing: {trust_line()}", flush=True)
    if view is not None:
        for script, speeds in view.speeds().items():
            print(speeds_line(script, speeds), flush=True)
    head_version = project_version()

    def one(remote: RemoteNode) -> str:
        state = RemoteWorker(remote).state()
        parts, problems = [], []
        several = len(state.workers) > 1
        for worker in state.workers:
            seen, trouble = worker_parts(worker, view)
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


def worker_parts(worker: WorkerProcess,
                 view: ClusterView | None) -> tuple[list[str], list[str]]:
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
        parts.append(f"queue {view.waiting(worker.slot)}")
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
