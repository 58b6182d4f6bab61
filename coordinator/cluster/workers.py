"""A node's worker driven from the head node: up, down, status, logs, systemd unit.

Each verb is a thin remote call of ``coordinator worker`` on the node (with its
``--detach`` / ``--stop`` / ``--status`` modes), so a node behaves the same
whether the head node or a person at its console started the worker. The
broker URL (which may hold a password) travels in an environment file written
over SFTP with mode 0600, never on a command line.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from typing import Any

import paramiko

from coordinator.cluster.inventory import Node
from coordinator.cluster.remote import NodeError, RemoteNode

# Head-node settings a node's worker must share (same key prefix, same timeouts).
FORWARDED_ENV = ("SC_VISIBILITY_TIMEOUT", "SC_RESTORE_INTERVAL", "SC_RESULT_EXPIRES",
                 "SC_RUN_TTL", "SC_KEY_PREFIX", "SC_TRACKING_URL", "SC_RESULT_BACKEND")
# A worker has this long to answer its first ping once started (seconds, slow nodes).
START_TIMEOUT_S = 90.0
# The longest a warm `down` waits for the running job before saying it is still finishing.
DOWN_TIMEOUT_S = 600.0


def worker_env(node: Node, head_broker: str) -> dict[str, str]:
    """The node worker's environment file: broker plus the settings both sides share."""
    env = {"SC_BROKER_URL": node.broker_url(head_broker)}
    env.update({name: os.environ[name] for name in FORWARDED_ENV if name in os.environ})
    return env


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


def worker_args(node: Node) -> list[str]:
    """``coordinator worker`` arguments that run this node's worker (up and the unit)."""
    return ["worker", "--node", node.label, "--scripts-dir", node.config.scripts_dir,
            "--workdir", node.config.workdir, "--pidfile", node.pidfile,
            "--logfile", node.logfile, "--env-file", node.envfile]


def up(remote: RemoteNode, head_broker: str) -> str:
    """Start the node's worker detached (idempotent: a live one is left as it is)."""
    node = remote.node
    # The node's directories need not exist yet (the Step 3 scorer is built in: no deploy).
    made = remote.run(["mkdir", "-p", "--", node.config.workdir, node.state_dir,
                       node.config.scripts_dir])
    if not made.ok:
        raise NodeError(f"could not create {node.state_dir} on the node: {made.last_line()}")
    write_private(remote, node.envfile, env_file_text(worker_env(node, head_broker)))
    result = remote.coordinator(*worker_args(node), "--detach",
                                timeout=START_TIMEOUT_S + 60)
    if not result.ok:
        raise NodeError(detach_failure(result.stderr or result.stdout))
    return result.last_line()


def detach_failure(text: str) -> str:
    """The remote error as one line, and the worker log's last lines it quoted, joined."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "worker did not start (no output)"
    head = lines[0].removeprefix("coordinator: error: ")
    return " | ".join([head, *lines[1:]])


def down(remote: RemoteNode, now: bool = False, timeout: float = DOWN_TIMEOUT_S,
         purge: bool = False) -> str:
    """Stop the worker ``up`` started (its pid file): warm, or ``now`` with its jobs.

    ``purge``: also remove the env file ``up`` wrote (it holds the broker's URL with its
    password); without it the file stays for the next ``up``, and the line says so.
    """
    node = remote.node
    args = ["worker", "--node", node.label, "--stop", "--pidfile", node.pidfile,
            "--timeout", f"{timeout:g}"]
    result = remote.coordinator(*args, *(["--now"] if now else []), timeout=timeout + 60)
    if not result.ok:
        raise NodeError(result.last_line().removeprefix("coordinator: error: "))
    if not purge:
        return f"{result.last_line()}; {node.envfile} stays (--purge removes it)"
    removed = remote.shell(f"rm -f -- {shlex.quote(node.envfile)}")
    if not removed.ok:
        raise NodeError(f"could not remove {node.envfile}: {removed.last_line()}")
    return f"{result.last_line()}; removed {node.envfile} (the broker password)"


def state(remote: RemoteNode) -> dict[str, Any]:
    """The node's view of its worker: pid, alive, stale, worker name, version."""
    return remote.worker_state()


def logs(remote: RemoteNode, lines: int) -> str:
    """The last ``lines`` lines of the node's worker log."""
    log = remote.node.logfile
    result = remote.shell(f"tail -n {int(lines)} -- {shlex.quote(log)}")
    if not result.ok:
        raise NodeError(f"cannot read {log} on the node: {result.last_line()}")
    return result.stdout


def systemd_unit(node: Node) -> str:
    """A systemd service that runs the node's worker, for users who prefer their init system.

    ``cluster up`` writes the environment file it reads; stop is warm (SIGTERM to
    the worker, which finishes its job), then everything left is killed.
    """
    command = shlex.join([node.config.python, "-m", "coordinator", *[
        arg for arg in worker_args(node) if arg not in ("--pidfile", node.pidfile)]])
    user = f"User={node.config.user}\n" if node.config.user else ""
    return (
        f"# /etc/systemd/system/scripts-coordinator-worker-{node.label}.service\n"
        f"# on {node.config.host}: systemctl daemon-reload && "
        f"systemctl enable --now scripts-coordinator-worker-{node.label}\n"
        "[Unit]\n"
        f"Description=scripts-coordinator worker for node {node.label} (queue {node.queue})\n"
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


def node_paths(node: Node) -> list[str]:
    """The directories on the node that the head node may write into."""
    return [posixpath.normpath(node.config.scripts_dir), posixpath.normpath(node.config.workdir)]
