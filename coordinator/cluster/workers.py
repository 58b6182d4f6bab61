"""A node's worker driven from the head node: ``RemoteWorker`` (start, close, state, logs),
and the systemd unit that runs the same worker.

Each action is a thin remote call of ``coordinator worker`` on the node (with its
``--detach`` / ``--stop`` / ``--status`` modes), so a node behaves the same
whether the head node or a person at its console started the worker. The
broker URL (which may hold a password) travels in an environment file written
over SFTP with mode 0600, never on a command line.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from dataclasses import dataclass
from typing import Any

import paramiko

from coordinator.cluster.deploy import REDIS_CA_NAME
from coordinator.cluster.inventory import Node
from coordinator.cluster.remote import NodeError, RemoteNode
from worker_tasks import signing
from worker_tasks.connections import CA_VARIABLE
from worker_tasks.spec import gpu_of_slot, slot_of

# Head-node settings a node's worker must share (same key prefix, same timeouts).
FORWARDED_ENV = ("SC_VISIBILITY_TIMEOUT", "SC_RESTORE_INTERVAL", "SC_RESULT_EXPIRES",
                 "SC_RUN_TTL", "SC_KEY_PREFIX", "SC_TRACKING_URL", "SC_RESULT_BACKEND",
                 "SC_SENTINEL_MASTER", "SC_SENTINEL_PASSWORD")
# A worker has this long to answer its first ping once started (seconds, slow nodes).
START_TIMEOUT_S = 90.0
# The longest a warm `down` waits for the running job before saying it is still finishing.
DOWN_TIMEOUT_S = 600.0
# A placeholder GPU index for the per-GPU template unit (replaced by systemd's %i).
GPU_INSTANCE = 0


def worker_env(node: Node, head_broker: str) -> dict[str, str]:
    """The node worker's environment file: broker plus the settings both sides share; when
    the head signs its jobs, the node's trust store, required (``cluster deploy`` puts the
    head's certificate there); when signing is off on purpose, off here too."""
    env = {"SC_BROKER_URL": node.broker_url(head_broker)}
    env.update({name: os.environ[name] for name in FORWARDED_ENV if name in os.environ})
    if os.environ.get(CA_VARIABLE):  # cluster deploy put the broker's CA there
        env[CA_VARIABLE] = posixpath.join(node.state_dir, REDIS_CA_NAME)
    if signing.unsigned():
        env[signing.UNSIGNED_VARIABLE] = "1"
    elif signing.signing_files() is not None:
        env[signing.TRUST_VARIABLE] = node.trust_dir
        env[signing.REQUIRE_VARIABLE] = "1"
        keys = posixpath.join(node.state_dir, signing.NODE_KEYS_DIR, signing.NODE_KEY_NAME)
        env[signing.KEY_VARIABLE] = f"{keys}.key"  # the node's own (node_key makes it)
        env[signing.CERT_VARIABLE] = f"{keys}.crt"
    return env


def node_key(remote: RemoteNode) -> str:
    """The node's own key, made on the node when it has none; its certificate kept on the
    head (``KEYS_DIR/nodes/LABEL.crt``), which then verifies the node's control replies."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    node = remote.node
    result = remote.coordinator("worker", "--node", node.label, "--workdir",
                                node.config.workdir, "--make-key")
    if not result.ok:
        raise NodeError(f"could not make the node's key: {result.last_line()}")
    try:
        cert = x509.load_pem_x509_certificate(result.stdout.encode())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError as err:
        raise NodeError(f"the node's certificate does not parse: {err}") from None
    if [name.value for name in names] != [node.label]:
        raise NodeError(f"the node's certificate names {names[0].value if names else 'nobody'}"
                        f", not {node.label}")
    store = signing.keys_dir() / signing.NODE_CERTS_DIR
    store.mkdir(parents=True, exist_ok=True)
    (store / f"{node.label}.crt").write_text(result.stdout)
    said = (result.stderr.strip().splitlines() or ["node key"])[-1]
    return said.removeprefix("coordinator: ")  # "node key made: PATH" or "... kept: PATH"


def env_file_text(env: dict[str, str]) -> str:
    for name, value in env.items():
        if "\n" in value or "\0" in value:
            raise NodeError(f"{name} holds a newline; it cannot go into the worker's env file")
    return "".join(f"{name}={value}\n" for name, value in sorted(env.items()))


def write_private(remote: RemoteNode, path: str, text: str) -> None:
    """Write ``text`` to ``path`` on the node, readable by its owner only."""
    sftp = remote.sftp()
    tmp = f"{path}.sc-tmp"
    try:
        with sftp.open(tmp, "w") as fh:
            sftp.chmod(tmp, 0o600)
            fh.write(text)
        sftp.posix_rename(tmp, path)
    except (OSError, paramiko.SSHException) as err:
        raise NodeError(f"could not write {path} on the node: {err}") from None
    finally:
        sftp.close()


def worker_args(node: Node, slot: str | None = None) -> list[str]:
    """``coordinator worker`` arguments that run the worker serving ``slot`` (default: the
    whole node; ``rig-a.gpu1``: GPU 1 of it), for up and the unit."""
    slot = slot or node.label
    gpu = gpu_of_slot(slot)
    return ["worker", "--node", node.label, *(["--gpu", str(gpu)] if gpu is not None else []),
            "--scripts-dir", node.config.scripts_dir, "--workdir", node.config.workdir,
            "--pidfile", node.pidfile(slot), "--logfile", node.logfile(slot),
            "--env-file", node.envfile, *([] if node.config.warm else ["--cold"])]


def up(remote: RemoteNode, head_broker: str, per_gpu: bool = False) -> str:
    """Start the node's worker detached, or with ``per_gpu`` one per GPU of it (``gpus``);
    idempotent: a live one is left as it is. The node refuses a whole-node worker beside
    per-GPU ones (they would run jobs on the same GPUs at once)."""
    node = remote.node
    # The node's directories need not exist yet (the Step 3 scorer is built in: no deploy).
    made = remote.run(["mkdir", "-p", "--", node.config.workdir, node.state_dir,
                       node.config.scripts_dir])
    if not made.ok:
        raise NodeError(f"could not create {node.state_dir} on the node: {made.last_line()}")
    env = worker_env(node, head_broker)
    lines = [node_key(remote)] if signing.KEY_VARIABLE in env else []
    write_private(remote, node.envfile, env_file_text(env))
    slots = node.slots(per_gpu)
    for done, slot in enumerate(slots):
        result = remote.coordinator(*worker_args(node, slot), "--detach",
                                    timeout=START_TIMEOUT_S + 60)
        if not result.ok:
            started = f"started {', '.join(slots[:done])}; " if done else ""
            where = f"{slot}: " if per_gpu else ""
            raise NodeError(f"{started}{where}{detach_failure(result.stderr or result.stdout)}")
        lines.append(result.last_line())
    return "; ".join(lines)


def detach_failure(text: str) -> str:
    """The remote error as one line, and the worker log's last lines it quoted, joined."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "worker did not start (no output)"
    head = lines[0].removeprefix("coordinator: error: ")
    return " | ".join([head, *lines[1:]])


def down(remote: RemoteNode, now: bool = False, timeout: float = DOWN_TIMEOUT_S,
         purge: bool = False) -> str:
    """Stop every worker ``up`` started on the node (by their pid files, whole node and per
    GPU): warm, all signalled at once, or ``now`` with their jobs.

    ``purge``: also remove the env file ``up`` wrote (it holds the broker's URL with its
    password); without it the file stays for the next ``up``, and the line says so.
    """
    node = remote.node
    args = ["worker", "--node", node.label, "--workdir", node.config.workdir, "--stop",
            "--timeout", f"{timeout:g}"]
    result = remote.coordinator(*args, *(["--now"] if now else []), timeout=timeout + 60)
    if not result.ok:
        raise NodeError(result.last_line().removeprefix("coordinator: error: "))
    stopped = "; ".join(line.strip() for line in result.stdout.splitlines() if line.strip())
    if not purge:
        return f"{stopped}; {node.envfile} stays (--purge removes it)"
    removed = remote.shell(f"rm -f -- {shlex.quote(node.envfile)}")
    if not removed.ok:
        raise NodeError(f"could not remove {node.envfile}: {removed.last_line()}")
    return f"{stopped}; removed {node.envfile} (the broker password)"


@dataclass(frozen=True)
class WorkerProcess:
    """One worker process of a node, as the node sees it (``coordinator worker --status``).

    Parameters:
        slot: what it serves: the node, or one GPU of it (``rig-a.gpu1``).
        pid: its pid file's pid, if any.
        alive: that process lives and is this worker.
        stale: a pid file is left by a worker that died.
        worker_name: its Celery name (``rig-a@host``), as ping answers name it.
    """

    slot: str
    pid: int | None
    alive: bool
    stale: bool
    worker_name: str


@dataclass(frozen=True)
class NodeState:
    """A node's own view of its workers, its version and its fastest scoring engine."""

    workers: list[WorkerProcess]
    version: str | None
    engine: str | None

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> NodeState:
        """From the JSON ``coordinator worker --status`` prints (``RemoteNode.worker_state``)."""
        return cls(workers=[WorkerProcess(slot=str(worker.get("slot")), pid=worker.get("pid"),
                                          alive=bool(worker.get("alive")),
                                          stale=bool(worker.get("stale")),
                                          worker_name=str(worker.get("worker_name")))
                            for worker in status.get("workers", [])],
                   version=status.get("version"), engine=status.get("engine"))


class RemoteWorker:
    """A node's worker (or its per-GPU workers), driven over the node's SSH connection.

    Parameters:
        remote: the node, over one connection (``RemoteNode``).
        head_broker: the broker's URL as the head node reaches it (``start`` needs it).
    """

    def __init__(self, remote: RemoteNode, head_broker: str | None = None) -> None:
        self.remote = remote
        self.head_broker = head_broker

    def start(self, per_gpu: bool = False) -> str:
        """Start it detached (idempotent); its line for ``cluster up`` (see ``up``)."""
        assert self.head_broker is not None, "starting a worker needs the broker's URL"
        return up(self.remote, self.head_broker, per_gpu)

    def close(self, now: bool = False, timeout: float = DOWN_TIMEOUT_S,
              purge: bool = False) -> str:
        """Stop it, warm or ``now``; its line for ``cluster down`` (see ``down``)."""
        return down(self.remote, now, timeout, purge)

    def state(self) -> NodeState:
        """The node's view of its workers, its version and its fastest engine."""
        return NodeState.from_status(self.remote.worker_state())

    def logs(self, lines: int) -> str:
        """The last ``lines`` lines of each of its logs (see ``logs``)."""
        return logs(self.remote, lines)


def logs(remote: RemoteNode, lines: int) -> str:
    """The last ``lines`` lines of each worker log of the node (whole node, per GPU; tail
    heads each with its file name when there are several)."""
    node = remote.node
    label = node.label  # letters, digits, '.', '_', '-': safe inside a glob
    script = (f"cd -- {shlex.quote(node.state_dir)} 2>/dev/null && "
              f"set -- $(ls -1 -- worker-{label}.log worker-{label}.gpu*.log 2>/dev/null) && "
              f"[ $# -gt 0 ] && tail -n {int(lines)} -- \"$@\"")
    result = remote.shell(script)
    if not result.ok:
        reason = result.last_line() if result.stderr.strip() else "no worker log there"
        raise NodeError(f"cannot read {node.logfile()} on the node: {reason}")
    return result.stdout


def systemd_unit(node: Node, per_gpu: bool = False) -> str:
    """A systemd service that runs the node's worker, for users who prefer their init system;
    ``per_gpu``: a template unit, one instance per GPU (``@0``, ``@1``, ...).

    ``cluster up`` writes the environment file it reads; stop is warm (SIGTERM to
    the worker, which finishes its job), then everything left is killed.
    """
    slot = slot_of(node.label, GPU_INSTANCE) if per_gpu else node.label
    args = worker_args(node, slot)
    pid_at = args.index("--pidfile")
    del args[pid_at:pid_at + 2]
    if per_gpu:  # the GPU index is the instance name
        args[args.index("--gpu") + 1] = "%i"
        args = [arg.replace(slot, f"{node.label}.gpu%i") for arg in args]
    command = shlex.join([node.config.python, "-m", "coordinator", *args])
    user = f"User={node.config.user}\n" if node.config.user else ""
    base = f"scripts-coordinator-worker-{node.label}"
    name = f"{base}@" if per_gpu else base
    enable = (" ".join(f"{base}@{gpu}" for gpu in range(node.config.gpus)) if per_gpu
              else base)
    queue = f"node.{node.label}.gpu%i" if per_gpu else node.queue
    what = f"GPU %i of node {node.label}" if per_gpu else f"node {node.label}"
    return (
        f"# /etc/systemd/system/{name}.service\n"
        f"# on {node.config.host}: systemctl daemon-reload && systemctl enable --now {enable}\n"
        "[Unit]\n"
        f"Description=scripts-coordinator worker for {what} (queue {queue})\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"{user}"
        f"WorkingDirectory={node.config.workdir}\n"
        f"EnvironmentFile={node.envfile}\n"
        f"ExecStart={command}\n"
        "# Warm stop: the running job finishes and writes its .done, then the rest is killed.\n"
        "KillSignal=SIGTERM\n"
        "KillMode=mixed\n"
        "TimeoutStopSec=infinity\n"
        "Restart=on-failure\n"
        "RestartSec=10\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )

