"""The inventory: which GPU nodes the head node drives, and how to reach them.

``cluster.toml`` (read with the standard library's ``tomllib``) has a
``[defaults]`` table and one ``[nodes.<label>]`` table per node; a node key
left out of a node's table comes from ``[defaults]``. The label is the node
name that jobs files use; ``host`` defaults to the label, so jobs files that
name nodes by address work unchanged. Every problem is one line, exit 2.
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from coordinator.broker import redact, with_password
from coordinator.cluster import INVENTORY_ENV, inventory_in_force
from coordinator.errors import InvalidJobsError
from worker_tasks.daemon import STATE_DIR
from worker_tasks.spec import is_floating, is_safe_name, slot_of


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and not posixpath.isabs(value):
        raise ValueError(f"{value!r} must be an absolute path on the node")
    return value


def _host(value: Any) -> Any:
    # Names and addresses only (IPv6 included): no spaces, no ssh options smuggled in.
    if isinstance(value, str) and not HOST_NAME.match(value):
        raise ValueError(f"{value!r} is not a host name or address")
    return value


def _extras(value: Any) -> Any:
    # TOML gives a list; the frozen config keeps a tuple. Only the extras the project has.
    if isinstance(value, list):
        unknown = [name for name in value if name not in INSTALL_EXTRAS]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not an extra of scripts-coordinator "
                             f"(known: {', '.join(INSTALL_EXTRAS)})")
        return tuple(dict.fromkeys(value))
    return value


NodePath = Annotated[str, BeforeValidator(_absolute)]
Extras = Annotated[tuple[str, ...], BeforeValidator(_extras)]
# The pip extras ``deploy --project`` may install on a node (pyproject.toml's).
INSTALL_EXTRAS = ("worker", "gpu", "head")
# What a node gets unless its table says otherwise: the Step 3 script's compiled engine.
DEFAULT_EXTRAS = ("worker",)
HostName = Annotated[str, BeforeValidator(_host)]
HOST_NAME = re.compile(r"[A-Za-z0-9_.:%\[\]-]{1,253}\Z")


class NodeConfig(BaseModel):
    """One node's settings, after ``[defaults]`` are applied.

    Parameters:
        host: SSH host name or address (default: the label).
        port: SSH port.
        user: SSH user (default: the SSH configuration's, else the local user).
        key: private key file on the head node (default: the SSH agent and ~/.ssh keys).
        python: the node's interpreter that has this project installed.
        scripts_dir: where the node's worker looks up job scripts (``deploy`` fills it).
        workdir: where the node's scripts run; outputs land under it.
        broker: the Redis URL as the node reaches it (default: the head's broker URL).
        shared_storage: the head node sees the node's workdir at its own workdir.
        gpus: how many GPUs the node has (``jobs scoring`` deals it that many shares;
            ``cluster up --per-gpu`` starts that many workers).
        extras: the pip extras ``deploy --project`` installs (``worker``: Numba;
            ``gpu``: CuPy); default ``["worker"]``.
        warm: ``cluster up`` starts the node's workers warm (each job's interpreter forked
            from a warm parent; the default), or with ``--cold`` (false).
        connect_timeout: seconds before an SSH connection attempt fails.
        strict_host_keys: refuse hosts missing from known_hosts (default: accept new ones).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    host: HostName
    port: int = Field(default=22, ge=1, le=65535)
    user: str | None = None
    key: str | None = None
    python: str = "python3"
    scripts_dir: NodePath
    workdir: NodePath
    broker: str | None = None
    shared_storage: bool = False
    gpus: int = Field(default=1, ge=1, le=64)
    extras: Extras = DEFAULT_EXTRAS
    warm: bool = True
    connect_timeout: float = Field(default=10.0, gt=0, le=600)
    strict_host_keys: bool = False


NODE_KEYS = frozenset(NodeConfig.model_fields)


@dataclass(frozen=True)
class Node:
    """A node of the inventory: its label (the name jobs files use) and its settings."""

    label: str
    config: NodeConfig

    @property
    def queue(self) -> str:
        return f"node.{self.label}"

    @property
    def state_dir(self) -> str:
        return posixpath.join(self.config.workdir, STATE_DIR)

    @property
    def trust_dir(self) -> str:
        """The node's trust store: the head's certificate, installed by ``cluster deploy``."""
        return posixpath.join(self.state_dir, "trusted")

    def slots(self, per_gpu: bool = False) -> list[str]:
        """What this node's workers serve: the node, or each of its GPUs (per-GPU runs)."""
        if not per_gpu:
            return [self.label]
        return [slot_of(self.label, gpu) for gpu in range(self.config.gpus)]

    def pidfile(self, slot: str | None = None) -> str:
        """The pid file of the worker serving ``slot`` (default: the whole node)."""
        return posixpath.join(self.state_dir, f"worker-{slot or self.label}.pid")

    def logfile(self, slot: str | None = None) -> str:
        return posixpath.join(self.state_dir, f"worker-{slot or self.label}.log")

    @property
    def envfile(self) -> str:
        return posixpath.join(self.state_dir, f"worker-{self.label}.env")

    @property
    def address(self) -> str:
        user = f"{self.config.user}@" if self.config.user else ""
        return f"{user}{self.config.host}:{self.config.port}"

    def broker_url(self, head_broker: str) -> str:
        """The broker as this node reaches it, with a password from the environment."""
        return with_password(self.config.broker or head_broker)

    def remote_path(self, relative: str) -> str:
        """A workdir-relative path (as jobs write them) on this node's disk."""
        return posixpath.normpath(posixpath.join(self.config.workdir, relative))


@dataclass(frozen=True)
class Inventory:
    """Every node of an inventory file, by label (in file order)."""

    path: Path
    nodes: dict[str, Node]

    def select(self, labels: Iterable[str] = ()) -> list[Node]:
        """The named nodes (all when none are named); an unknown label is exit 2."""
        wanted = list(labels)
        if not wanted:
            return list(self.nodes.values())
        unknown = [label for label in wanted if label not in self.nodes]
        if unknown:
            raise InvalidJobsError(
                f"{self.path}: no node {', '.join(map(repr, unknown))} in the inventory "
                f"(it has {', '.join(self.nodes) or 'none'})")
        return [self.nodes[label] for label in dict.fromkeys(wanted)]

    def resolve(self, name: str) -> str | None:
        """The label a jobs file's node name stands for: a label, or a node's host (a
        floating job's ``any`` stands for itself)."""
        if name in self.nodes or is_floating(name):
            return name
        labels = [label for label, node in self.nodes.items() if node.config.host == name]
        return labels[0] if len(labels) == 1 else None

    @property
    def any_node_local_storage(self) -> bool:
        return any(not node.config.shared_storage for node in self.nodes.values())


def find_inventory(explicit: str | Path | None = None) -> Inventory | None:
    """The inventory in force for run commands: loaded if named or present, else None."""
    path = inventory_in_force(explicit)
    return None if path is None else load_inventory(path)


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory file; every problem is one ``InvalidJobsError`` line."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidJobsError(
            f"{path}: inventory not found (write one with: coordinator cluster init > {path}; "
            f"or give --inventory FILE / ${INVENTORY_ENV})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidJobsError(f"{path}: cannot read the inventory: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise InvalidJobsError(f"{path}: invalid TOML: {err}") from None
    return parse_inventory(document, path)


def parse_inventory(document: dict[str, Any], path: Path) -> Inventory:
    unknown = sorted(set(document) - {"defaults", "nodes"})
    if unknown:
        raise InvalidJobsError(f"{path}: unknown table {unknown[0]!r} (expected [defaults] "
                               f"and [nodes.<label>])")
    defaults = document.get("defaults", {})
    tables = document.get("nodes", {})
    if not isinstance(defaults, dict) or not isinstance(tables, dict):
        raise InvalidJobsError(f"{path}: [defaults] and [nodes] must be tables")
    check_keys(path, "[defaults]", defaults)
    if not tables:
        raise InvalidJobsError(f"{path}: no nodes (add a [nodes.<label>] table per GPU node)")
    nodes: dict[str, Node] = {}
    for label, table in tables.items():
        where = f"[nodes.{label}]"
        if not is_safe_name(label):
            raise InvalidJobsError(f"{path}: {where}: {label!r} is not a valid node label "
                                   f"(letters, digits, '.', '_', '-')")
        if is_floating(label):
            raise InvalidJobsError(f"{path}: {where}: '{label}' is reserved: a job whose node "
                                   f"is '{label}' floats to the first free node")
        if not isinstance(table, dict):
            raise InvalidJobsError(f"{path}: {where} must be a table")
        check_keys(path, where, table)
        merged = {"host": label, **defaults, **table}
        try:
            config = NodeConfig.model_validate(merged)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            if first["type"] == "missing":
                message = f"not set (in {where} or [defaults])"
            raise InvalidJobsError(f"{path}: {where}: {field}: {message}") from None
        nodes[label] = Node(label=label, config=config)
    return Inventory(path=path, nodes=nodes)


def check_keys(path: Path, where: str, table: dict[str, Any]) -> None:
    unknown = sorted(set(table) - NODE_KEYS)
    if unknown:
        raise InvalidJobsError(f"{path}: {where}: unknown key {unknown[0]!r} "
                               f"(known: {', '.join(sorted(NODE_KEYS))})")


def describe(node: Node) -> str:
    """One line about a node for listings; credentials masked."""
    broker = redact(node.config.broker) if node.config.broker else "the head's broker"
    storage = "shared" if node.config.shared_storage else "node-local"
    return f"{node.address}  workdir {node.config.workdir} ({storage})  broker {broker}"


EXAMPLE = '''\
# scripts-coordinator inventory: the GPU nodes the head node drives over SSH.
# Every [nodes.<label>] key may also be set once in [defaults].
# Use: coordinator cluster deploy / up / status / logs / down  (--inventory FILE,
# or $SC_INVENTORY; default ./cluster.toml).

[defaults]
user = "pipeline"                 # SSH user on the nodes
# key = "~/.ssh/id_ed25519"       # private key on this head node; leave out for the SSH agent
python = "/opt/pipeline/.venv/bin/python"   # the node's Python with scripts-coordinator installed
scripts_dir = "/opt/pipeline"     # job scripts on the node (coordinator cluster deploy fills it)
workdir = "/data/pipeline"        # where jobs run on the node; outputs land under it
broker = "redis://zeus:6379/0"    # Redis as the nodes reach it; a password may come from
                                  # $SC_BROKER_PASSWORD on the head node instead of this file
shared_storage = false            # true if this head node sees each node's workdir (NFS)
extras = ["worker", "gpu"]        # installed with the project by deploy --project: worker
                                  # (Numba: the fast CPU engine), gpu (CuPy); CPU nodes: ["worker"]
# warm = false                    # start jobs' interpreters fresh (worker --cold); by default
                                  # they fork from a warm parent: no start-up per job
# connect_timeout = 10            # seconds before an SSH connection attempt fails
# strict_host_keys = false        # true: refuse hosts missing from ~/.ssh/known_hosts

[nodes.rig-a]                     # the label jobs files use ("node": "rig-a")
host = "gpu-node-1.lan"           # defaults to the label, so addresses as labels work too
port = 22
gpus = 2                          # jobs scoring deals it two shares; cluster up --per-gpu
                                  # starts one worker per GPU (for runs submitted with --per-gpu)

[nodes.rig-b]
host = "gpu-node-2.lan"
gpus = 1
'''
