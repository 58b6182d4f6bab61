"""One GPU node over one SSH connection (Fabric): ``start()`` connects, ``close()`` ends it.

Everything the head node does on a node goes through a ``RemoteNode``: run a
command, call this project's own CLI with the node's Python (``python -m
coordinator ...``, so the node runs the same code as ``coordinator worker``
would by hand), and open SFTP. SSH failures become ``NodeError`` with one
line saying why (unreachable, auth refused, Python missing, ...).
"""

from __future__ import annotations

import json
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut

from coordinator.cluster.inventory import Node

# Seconds a remote command may take unless the caller says otherwise.
COMMAND_TIMEOUT_S = 120.0
# Exit status of a shell that could not find the program (POSIX).
COMMAND_NOT_FOUND = 127


class NodeError(Exception):
    """A node could not do what was asked; ``str()`` is one line saying why."""


@dataclass(frozen=True)
class RemoteResult:
    """What a remote command returned."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def last_line(self) -> str:
        """The last non-empty line of stderr (else stdout): the usual one-line reason."""
        for text in (self.stderr, self.stdout):
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return f"exit status {self.exit_code}"


def explain_ssh_error(node: Node, err: BaseException) -> str:
    """One line for an SSH failure, naming the node's address and the kind of failure."""
    where = node.address
    if isinstance(err, paramiko.AuthenticationException):
        key = f" with key {node.config.key}" if node.config.key else " (agent / default keys)"
        return f"auth refused by {where}{key}: {err}"
    if isinstance(err, paramiko.BadHostKeyException):
        return f"host key of {where} does not match known_hosts: refused"
    if isinstance(err, paramiko.SSHException) and "not found in known_hosts" in str(err):
        return f"host {where} is not in known_hosts and strict_host_keys is on: refused"
    if isinstance(err, socket.timeout | TimeoutError):
        return f"unreachable: {where}: no answer within {node.config.connect_timeout:g} s"
    if isinstance(err, paramiko.ssh_exception.NoValidConnectionsError):
        reasons = {str(sub.strerror or sub) for sub in err.errors.values()}
        return f"unreachable: {where}: {'; '.join(sorted(reasons))}"
    if isinstance(err, socket.gaierror):
        return f"unreachable: {where}: host name not known ({err.strerror})"
    if isinstance(err, OSError):
        return f"unreachable: {where}: {err.strerror or err}"
    if isinstance(err, paramiko.SSHException):
        return f"SSH error with {where}: {err}"
    return f"{type(err).__name__} with {where}: {err}"


class RemoteNode:
    """A node of the inventory, driven over one Fabric connection.

    Parameters:
        node: the inventory entry (label and settings).
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.connection: Connection | None = None

    @property
    def label(self) -> str:
        return self.node.label

    def __repr__(self) -> str:
        return f"RemoteNode({self.label!r}, {self.node.address})"

    def start(self) -> RemoteNode:
        """Open the SSH connection; raises ``NodeError`` saying why it failed."""
        config = self.node.config
        connect_kwargs: dict[str, Any] = {"banner_timeout": config.connect_timeout,
                                          "auth_timeout": config.connect_timeout}
        if config.key:
            connect_kwargs.update(key_filename=str(Path(config.key).expanduser()),
                                  look_for_keys=False, allow_agent=False)
        connection = Connection(config.host, user=config.user, port=config.port,
                                connect_timeout=config.connect_timeout,
                                connect_kwargs=connect_kwargs)
        if config.strict_host_keys:
            connection.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            connection.open()
        except Exception as err:  # paramiko and socket raise many kinds; each is explained
            connection.close()
            raise NodeError(explain_ssh_error(self.node, err)) from None
        self.connection = connection
        return self

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def __enter__(self) -> RemoteNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT_S) -> RemoteResult:
        """Run a command (quoted argument by argument); never raises on a non-zero exit."""
        return self.shell(shlex.join(argv), timeout=timeout)

    def shell(self, command: str, timeout: float = COMMAND_TIMEOUT_S) -> RemoteResult:
        """Run a shell command line as given (the caller quotes)."""
        if self.connection is None:
            self.start()
        assert self.connection is not None
        try:
            result = self.connection.run(command, hide=True, warn=True, in_stream=False,
                                         timeout=timeout)
        except CommandTimedOut:
            raise NodeError(f"{self.node.address}: command timed out after {timeout:g} s: "
                            f"{command[:80]}") from None
        except (paramiko.SSHException, OSError) as err:
            raise NodeError(explain_ssh_error(self.node, err)) from None
        return RemoteResult(exit_code=result.exited, stdout=result.stdout, stderr=result.stderr)

    def coordinator(self, *args: str, timeout: float = COMMAND_TIMEOUT_S) -> RemoteResult:
        """``<python> -m coordinator ARGS`` on the node; a missing Python or project: NodeError."""
        python = self.node.config.python
        result = self.run([python, "-m", "coordinator", *args], timeout=timeout)
        self.check_python(result)
        return result

    def check_python(self, result: RemoteResult) -> None:
        python = self.node.config.python
        if result.exit_code == COMMAND_NOT_FOUND:
            raise NodeError(f"Python missing on the node: {python} not found "
                            f"(set 'python' in the inventory)")
        if "No module named coordinator" in result.stderr:
            raise NodeError(f"scripts-coordinator is not installed for {python} on the node "
                            f"(coordinator cluster deploy --project installs it)")

    def worker_state(self) -> dict[str, Any]:
        """The node's own view of its workers (``workers``: each one's slot, pid, liveness),
        its version, host name and best scoring engine (``coordinator worker --status``)."""
        result = self.coordinator("worker", "--node", self.label, "--status",
                                  "--workdir", self.node.config.workdir)
        if not result.ok:
            raise NodeError(f"worker --status failed: {result.last_line()}")
        try:
            state = json.loads(result.stdout)
        except ValueError:
            raise NodeError(f"worker --status printed no JSON: {result.last_line()}") from None
        if not isinstance(state, dict):
            raise NodeError("worker --status printed something other than a JSON object")
        if "workers" not in state:  # a node with an older version: one worker, no engine
            state = {**state, "workers": [{**state, "slot": self.label}]}
        return state

    def sftp(self) -> paramiko.SFTPClient:
        """A new SFTP client on this node's connection; the caller closes it. Not Fabric's
        ``Connection.sftp()``: that one is cached, and Fabric's own ``put`` would get it back
        closed after a push (deploy --project after the scripts: "Socket is closed")."""
        if self.connection is None:
            self.start()
        assert self.connection is not None
        try:
            return self.connection.client.open_sftp()
        except (paramiko.SSHException, OSError) as err:
            raise NodeError(f"SFTP to {self.node.address} failed: {err}") from None
