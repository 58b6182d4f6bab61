"""The head node's SSH side: an inventory of GPU nodes driven over Fabric.

    inventory.py  cluster.toml: labels, hosts, paths on the nodes (one-line errors)
    remote.py     RemoteNode: one node over one SSH connection (start/close/run)
    group.py      Cluster: label -> RemoteNode, one action on every node in parallel
    sync.py       files both ways over SFTP (hash-compared push, size-skipping fetch)
    workers.py    a node's worker: up, down, status, logs, systemd unit
    deploy.py     scripts, data and the project itself onto the nodes (``Deployment``)
    trust.py      the head's key and the certificate the nodes trust
    outputs.py    node-local storage: inputs pushed before a run, outputs fetched after

The package is the cluster's one face to the CLI: the names in ``__all__`` are imported
from their modules on first use, so importing this package loads nothing and Fabric is
imported only by a verb that uses it. Where the inventory is (``inventory_path``,
``inventory_in_force``) is answered here, so a command without one never loads the
inventory's model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Where each public name lives (imported on first use).
_HOME = {
    "Cluster": "group", "NodeOutcome": "group",
    "RemoteNode": "remote", "NodeError": "remote",
    "Inventory": "inventory", "find_inventory": "inventory", "load_inventory": "inventory",
    "EXAMPLE": "inventory",
    "RemoteWorker": "workers", "WorkerProcess": "workers", "systemd_unit": "workers",
    "Deployment": "deploy",
    "head_key": "trust", "head_certificate": "trust", "trust_line": "trust",
    "UNSIGNED_VARIABLE": "trust",
}
__all__ = sorted(_HOME)

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


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'coordinator.cluster' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"coordinator.cluster.{module}"), name)
    globals()[name] = value
    return value
