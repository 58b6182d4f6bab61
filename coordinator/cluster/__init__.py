"""The head node's SSH side: an inventory of GPU nodes driven over Fabric.

    inventory.py  cluster.toml: labels, hosts, paths on the nodes (one-line errors)
    remote.py     RemoteNode: one node over one SSH connection (start/close/run)
    group.py      Cluster: label -> RemoteNode, one action on every node in parallel
    sync.py       files both ways over SFTP (hash-compared push, size-skipping fetch)
    workers.py    a node's worker: up, down, status, logs, systemd unit
    deploy.py     scripts, data and the project itself onto the nodes
    outputs.py    node-local storage: inputs pushed before a run, outputs fetched after

Importing this package loads nothing; Fabric is imported by the modules that use it. Where
the inventory is (``inventory_path``, ``inventory_in_force``) is answered here, so a command
without one never loads the inventory's model.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_INVENTORY = "cluster.toml"
INVENTORY_ENV = "SC_INVENTORY"


def inventory_path(explicit: str | Path | None = None) -> Path:
    """``--inventory``, else ``$SC_INVENTORY``, else ``./cluster.toml``."""
    return Path(explicit or os.environ.get(INVENTORY_ENV) or DEFAULT_INVENTORY)


def inventory_in_force(explicit: str | Path | None = None) -> Path | None:
    """The inventory run commands use: one named (flag or environment) or present, else
    None."""
    path = inventory_path(explicit)
    if explicit is None and not os.environ.get(INVENTORY_ENV) and not path.exists():
        return None
    return path
