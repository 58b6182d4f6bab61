"""Node verbs: ``worker`` (this machine's worker for one node) and ``local`` (a whole cluster here).

``coordinator worker`` has four modes: in the foreground (default; the Celery
worker replaces this process), ``--detach`` (in a session of its own, with a
pid file and a log file; what ``cluster up`` runs over SSH), ``--stop`` and
``--status`` (what ``cluster down`` and ``cluster status`` run).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator import project_version
from coordinator.broker import broker_url as resolve_broker_url
from coordinator.broker import check_broker, connect_tracking, publisher
from coordinator.cli.common import PROG, CommandFactory, existing_dir
from coordinator.cli.runs import (
    add_original_flags,
    add_retry_flags,
    follow,
    notice,
    prepare_args,
    print_plan,
)
from coordinator.errors import ClusterStartError, ExitCode, InvalidJobsError, NodeFailedError
from coordinator.options import DEFAULTS
from worker_tasks import daemon
from worker_tasks.daemon import STATE_DIR
from worker_tasks.spec import (
    MAX_GPU_ID,
    gpu_of_slot,
    is_floating,
    is_safe_name,
    node_of_slot,
    queue_for,
    slot_of,
    slot_of_worker,
)

if TYPE_CHECKING:  # the verbs import these when they run: --help stays quick
    import redis
    from celery import Celery

    from coordinator.plan import Plan

# Lines of the worker's log quoted when it dies at start.
LOG_TAIL_LINES = 5
# How often a starting worker is looked for in the presence registry (seconds).
PING_INTERVAL_S = 0.5
# How long a worker listed as serving the node has to answer the ping that proves it
# alive (seconds).
PING_TIMEOUT_S = 1.0


def check_signing(args: argparse.Namespace) -> None:
    """A worker that must run only signed jobs has a trust store it can read (exit 2)."""
    from worker_tasks import signing

    if args.trusted_certs:
        os.environ[signing.TRUST_VARIABLE] = str(Path(args.trusted_certs).resolve())
    if args.require_signed:
        os.environ[signing.REQUIRE_VARIABLE] = "1"
    if signing.flag(signing.REQUIRE_VARIABLE) and signing.trust_store() is None:
        raise InvalidJobsError(
            f"node {args.slot}: signed jobs are required but there is no trust store: give "
            f"--trusted-certs DIR (the head's certificate; cluster deploy installs it), or "
            f"set {signing.UNSIGNED_VARIABLE}=1 to run unsigned jobs deliberately")
    try:
        signing.register(signing.Part.WORKER)
    except signing.SigningError as err:
        raise InvalidJobsError(f"node {args.slot}: {err}") from None


def load_env_file(path: str) -> None:
    """``KEY=VALUE`` lines (systemd's EnvironmentFile, unquoted) into this environment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise InvalidJobsError(f"--env-file {path}: {err.strerror or err}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise InvalidJobsError(f"--env-file {path}: line {number} is not NAME=VALUE")
        os.environ[name.strip()] = value


def state_path(args: argparse.Namespace, kind: str) -> Path:
    """``--pidfile`` / ``--logfile``, else ``<workdir>/.scripts-coordinator/worker-<slot>.pid``."""
    given = getattr(args, f"{kind}file")
    if given:
        return Path(given)
    return Path(args.workdir) / STATE_DIR / f"worker-{args.slot}.{kind}"


def log_tail(logfile: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        text = logfile.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


def cmd_worker(args: argparse.Namespace) -> int:
    from coordinator.local import worker_command

    if not is_safe_name(args.node):
        raise InvalidJobsError(f"--node {args.node!r}: use letters, digits, '.', '_', '-'")
    if is_floating(args.node):
        raise InvalidJobsError(f"--node {args.node}: reserved for floating jobs (every worker "
                               f"takes them); name the node itself, e.g. --node rig-a")
    if args.gpu is not None and not 0 <= args.gpu <= MAX_GPU_ID:  # per-GPU mode
        raise InvalidJobsError(f"--gpu {args.gpu}: give a GPU index in 0..{MAX_GPU_ID}")
    # What this worker serves one job at a time: the node, or one GPU of it.
    args.slot = slot_of(args.node, args.gpu)
    if args.env_file:
        load_env_file(args.env_file)
    if args.make_key:
        return make_node_key(args)
    pidfile, logfile = state_path(args, "pid"), state_path(args, "log")
    if args.status or args.stop:
        # No --gpu and no --pidfile: every worker of the node here (whole node, per GPU).
        slots = (node_slots(args) if args.gpu is None and not args.pidfile else
                 {args.slot: (pidfile, logfile)})
        if args.status:
            return worker_status(args, slots)
        try:
            lines = daemon.stop_all([(files[0], queue_for(slot)) for slot, files in
                                     slots.items()], now=args.now, timeout=args.timeout)
        except TimeoutError as err:
            raise NodeFailedError(str(err)) from None
        for slot, line in zip(slots, lines, strict=True):
            print(line if len(slots) == 1 else f"{slot}: {line}")
        return ExitCode.OK

    marker = queue_for(args.slot)
    current = daemon.read_pidfile(pidfile, marker)
    if current.alive:
        if args.detach:
            print(f"already running (pid {current.pid}, log {logfile})")
            return ExitCode.OK
        raise InvalidJobsError(f"node {args.slot}: a worker is already running (pid "
                               f"{current.pid}, pid file {pidfile})")
    note = f"; replaced stale pid file (pid {current.pid} gone)" if current.stale else ""
    check_signing(args)
    app = publisher(args.broker)
    check_broker(app)
    others = other_workers(connect_tracking(None, args.broker), app, args.slot)
    if others and not args.force:
        mode = ("a second worker would run its jobs in parallel (one at a time per node)"
                if all(slot_of_worker(name) == args.slot for name in others) else
                "per-node and per-GPU workers of one node would run jobs on the same GPUs at "
                "once (stop the other kind first)")
        raise InvalidJobsError(f"node {args.slot} is already served by {', '.join(others)}: "
                               f"{mode}; --force starts it anyway")
    os.environ["SC_BROKER_URL"] = resolve_broker_url(args.broker)
    os.environ.update(warm_env(args))
    os.environ["SC_SCRIPTS_DIR"] = str(Path(args.scripts_dir).resolve())
    os.environ["SC_WORKDIR"] = str(Path(args.workdir).resolve())
    command = worker_command(args.slot, args.loglevel)
    if args.detach:
        return start_detached(args, command, pidfile, logfile, note)
    print(f"{PROG}: starting worker for node {args.slot}: {' '.join(command[1:])}",
          file=sys.stderr, flush=True)
    os.chdir(args.workdir)
    if args.pidfile:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")  # exec keeps the pid
    if args.logfile:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    os.execv(sys.executable, command)  # the worker replaces this process: signals go to it


def other_workers(tracking: redis.Redis, app: Celery, slot: str) -> list[str]:
    """The workers serving ``slot`` already, or the same GPUs by the other mode (a whole-node
    worker beside per-GPU ones would run jobs on one GPU at once), by the presence registry
    (one read, at any width). The other GPUs' workers of the node are no second worker of
    this one. A killed worker stays listed for ``PRESENCE_TTL_S``: one ping to the names
    listed settles which are alive."""
    from worker_tasks.presence import serving

    node = node_of_slot(slot)
    whole = gpu_of_slot(slot) is None
    names = [name for name in serving(tracking, [node]).get(node, [])
             if slot_of_worker(name) == slot
             or whole != (gpu_of_slot(slot_of_worker(name)) is None)]
    if not names:
        return []
    answered = {name for reply in app.control.ping(destination=names, timeout=PING_TIMEOUT_S)
                for name in reply}
    return [name for name in names if name in answered]


def start_detached(args: argparse.Namespace, command: list[str], pidfile: Path, logfile: Path,
                   note: str) -> int:
    """Start the worker in its own session and wait until it announces itself (or dies)."""
    from coordinator.local import READY_TIMEOUT_S, worker_name
    from worker_tasks.presence import seen_since

    started = time.time()
    process = daemon.start_detached(command, os.environ, Path(args.workdir).resolve(), pidfile,
                                    logfile)
    name = worker_name(args.slot)
    tracking = connect_tracking(None, args.broker)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pidfile.unlink(missing_ok=True)
            tail = "\n".join(f"  {line}" for line in log_tail(logfile))
            raise ClusterStartError(f"worker died at start (exit status {process.returncode}); "
                                    f"last lines of {logfile}:\n{tail}")
        # Ready once it announces itself (presence): one Redis read, not a ping to all.
        if name in seen_since(tracking, [node_of_slot(args.slot)], started):
            print(f"started worker {name} (pid {process.pid}, log {logfile}){note}")
            return ExitCode.OK
        time.sleep(PING_INTERVAL_S)
    raise ClusterStartError(f"worker pid {process.pid} did not answer within "
                            f"{READY_TIMEOUT_S:g} s; see {logfile}")


def node_slots(args: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """slot -> (pid file, log file) of every worker of ``--node`` that has a pid file under
    ``--workdir`` (the whole node's first, then its GPUs in order); the whole node's alone
    when there is none."""
    state_dir = Path(args.workdir) / STATE_DIR
    slots = {}
    for path in state_dir.glob(f"worker-{glob.escape(args.node)}*.pid"):
        slot = path.name.removeprefix("worker-").removesuffix(".pid")
        if node_of_slot(slot) == args.node:
            slots[slot] = (path, path.with_suffix(".log"))
    if not slots:
        args.slot = args.node
        return {args.node: (state_path(args, "pid"), state_path(args, "log"))}
    return dict(sorted(slots.items(), key=lambda item: gpu_index(item[0])))


def gpu_index(slot: str) -> int:
    """Sort key: the whole node (-1) first, then its GPUs by number (gpu2 before gpu10)."""
    gpu = gpu_of_slot(slot)
    return -1 if gpu is None else gpu


def make_node_key(args: argparse.Namespace) -> int:
    """The node's key, made here if absent (never copied off the node); its certificate on
    stdout for the head to trust, a line on stderr saying which."""
    from worker_tasks.signing import ensure_node_key

    key, cert, made = ensure_node_key(Path(args.workdir) / STATE_DIR, args.node)
    print(f"{PROG}: node key {'made' if made else 'kept'}: {key}", file=sys.stderr)
    sys.stdout.write(cert.read_text())
    return ExitCode.OK


def worker_status(args: argparse.Namespace, slots: dict[str, tuple[Path, Path]]) -> int:
    """The node's workers as one JSON object: each one's pid file state, and what the node
    has (version, Python, the fastest scoring engine it can use)."""
    from coordinator.local import worker_name
    from scoring.backends import best_engine

    workers = []
    for slot, (pidfile, logfile) in slots.items():
        state = daemon.read_pidfile(pidfile, queue_for(slot))
        workers.append({"slot": slot, "pid": state.pid, "alive": state.alive,
                        "stale": state.stale, "worker_name": worker_name(slot),
                        "pidfile": str(pidfile), "logfile": str(logfile)})
    print(json.dumps({
        "node": args.node, "workers": workers, "hostname": socket.gethostname(),
        "version": project_version(), "python": sys.executable, "engine": best_engine(),
    }))
    return ExitCode.OK


def cmd_local(args: argparse.Namespace) -> int:
    """A private Redis and a worker per slot of the plan, the run followed, all stopped; or
    (``--up``, ``--status``, ``--down``) a local cluster that stays up."""
    from coordinator import local, standing

    if args.serve:  # the supervisor ``--up`` starts (not for people)
        return local.serve(node_list(args.nodes), Path(args.scripts_dir), Path(args.workdir),
                           warm_env(args))
    if args.up:
        cluster = local.keep_up(node_list(args.nodes), Path(args.scripts_dir).resolve(),
                                Path(args.workdir).resolve(), warm=args.warm)
        print("\n".join(["local cluster up:", *(f"  {line}" for line in cluster.lines())]))
        return ExitCode.OK
    if args.down:
        print(local.take_down())
        return ExitCode.OK
    if args.status:
        cluster = standing.StandingCluster.read()
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
    up = standing.StandingCluster.read()
    if up is not None:  # submit to the cluster that stays up, and follow the run there
        from coordinator.run import publish

        run = publish(plan, broker_url=up.broker_url, notice=notice)
        print(f"run {run.id}: {len(plan.specs)} jobs published to the local cluster that is up "
              f"({up.broker_url})", file=sys.stderr, flush=True)
        return follow(run, args)
    return run_local(plan, Path(args.scripts_dir), args.nodes, warm_env(args), args)


def node_list(text: str | None) -> list[str]:
    """``--nodes rig-a,rig-b`` for a cluster that stays up (default: two nodes)."""
    from coordinator.local import DEFAULT_NODES

    return nodes_flag(text) or list(DEFAULT_NODES)


def nodes_flag(text: str | None) -> list[str]:
    """The node labels (or GPU slots) of ``--nodes``, each checked by the node-name rule."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    for name in names:
        if not is_safe_name(name) or is_floating(name):
            raise InvalidJobsError(f"--nodes: {name!r} is not a node name")
    return names


def run_local(plan: Plan, scripts_dir: Path, nodes: str | None, worker_env: dict[str, str],
              following: argparse.Namespace) -> int:
    """Run ``plan`` on a throwaway local cluster (``local``, ``demo``): its exit status.

    ``nodes``: extra nodes to start a worker for (``--nodes``); ``following``: how the run is
    followed and collected (``--timeout``, ``--workdir``, ``--failover``, ``--joblog``).
    """
    from coordinator.local import LocalCluster
    from coordinator.run import publish
    from worker_tasks import signing

    slots = local_slots(plan, nodes)  # nodes, or each node's GPUs
    print(f"local cluster: private Redis and {len(slots)} workers ({', '.join(slots)})",
          file=sys.stderr, flush=True)
    log_dir = plan.options.workdir / plan.output_dir / "logs"
    try:
        with LocalCluster(slots, str(scripts_dir), plan.options.workdir, log_dir=log_dir,
                          extra_env=worker_env, die_with_parent=True,
                          signed=not signing.unsigned()) as cluster:
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


def local_slots(plan: Plan, extra: str | None) -> list[str]:
    """The slots ``local`` starts a worker for: the plan's pinned ones and ``--nodes``.

    A floating job needs no slot of its own; with only floating jobs and no ``--nodes``
    there is nothing to run them on.
    """
    wanted = {slot for slot in plan.slots() if not is_floating(node_of_slot(slot))}
    wanted.update(nodes_flag(extra))
    if not wanted:
        raise InvalidJobsError("every job floats and no node is named: give the nodes to run "
                               "them on, e.g. --nodes rig-a,rig-b")
    return sorted(wanted)


def add_warm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--warm", action="store_true",
                        help="fork each job's interpreter from a warm parent that has imported "
                             "--preload once (no interpreter start per job; a job says "
                             "\"warm\": false to start fresh); a failed preload is one line in "
                             "the worker log, and jobs then run cold")
    parser.add_argument("--preload", metavar="MODULES", type=module_list,
                        help="with --warm: the modules the warm parent imports, comma-"
                             "separated (default: numpy,scoring.warm_engines, the Step 3 "
                             "script's engines), e.g. --preload numpy,torch")


def module_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not all(part.isidentifier() for part in name.split("."))]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a module name")
    return names


def warm_env(args: argparse.Namespace) -> dict[str, str]:
    """The workers' environment for ``--warm`` / ``--preload`` (empty without ``--warm``)."""
    if args.preload is not None and not args.warm:
        raise InvalidJobsError("--preload: give --warm too (it says what the warm parent "
                               "imports)")
    from worker_tasks.warm import worker_settings

    return worker_settings(args.preload) if args.warm else {}


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
    sub.add_argument("--cold", action="store_true",
                     help="start each job's interpreter fresh (the default, until warm is)")
    for action in sub._actions:  # noqa: SLF001 (--up/--status/--down need no jobs file)
        if "--jobs-file" in action.option_strings:
            action.required = False
    sub.set_defaults(handler=cmd_local)
