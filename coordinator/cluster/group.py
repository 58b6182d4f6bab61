"""A group of nodes: the inventory's nodes as ``RemoteNode`` objects, driven in parallel.

    cluster = Cluster(load_inventory("cluster.toml"))
    outcomes = cluster.each(lambda node: node.worker_state()["pid"])
    cluster.close()

``Cluster`` is a plain mapping of label to ``RemoteNode``; ``each`` runs one
action per node on a thread per node and turns each node's result or failure
into a ``NodeOutcome`` (one line), so one dead node never stops the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from coordinator.cluster.inventory import Inventory
from coordinator.cluster.remote import NodeError, RemoteNode

# Threads for per-node work: enough for a few hundred nodes without starving the head node.
MAX_PARALLEL_NODES = 64


@dataclass(frozen=True)
class NodeOutcome:
    """What one node did: ``ok`` and one line, or a failure and one line saying why."""

    label: str
    ok: bool
    message: str
    value: Any = None

    def line(self, width: int = 12) -> str:
        return f"{self.label:<{width}} {'ok' if self.ok else 'FAILED':<6} {self.message}"


class Cluster(Mapping[str, RemoteNode]):
    """The nodes of an inventory (or the named ones), each over its own SSH connection.

    Parameters:
        inventory: the loaded inventory.
        labels: act on these nodes only (default: all).
    """

    def __init__(self, inventory: Inventory, labels: Iterable[str] = ()) -> None:
        self.inventory = inventory
        self.nodes: dict[str, RemoteNode] = {
            node.label: RemoteNode(node) for node in inventory.select(labels)}

    def __getitem__(self, label: str) -> RemoteNode:
        return self.nodes[label]

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def each(self, action: Callable[[RemoteNode], str | tuple[str, Any]],
             labels: Iterable[str] | None = None) -> list[NodeOutcome]:
        """Run ``action`` on every node in parallel; outcomes in inventory order.

        ``action`` returns the node's one-line message (or ``(message, value)``);
        a ``NodeError`` it raises is that node's failure, in one line.
        """
        chosen = [self.nodes[label] for label in (labels or self.nodes)]
        if not chosen:
            return []

        def one(remote: RemoteNode) -> NodeOutcome:
            try:
                result = action(remote)
            except NodeError as err:
                return NodeOutcome(remote.label, False, str(err))
            message, value = result if isinstance(result, tuple) else (result, None)
            return NodeOutcome(remote.label, True, message, value)

        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_NODES, len(chosen))) as pool:
            return list(pool.map(one, chosen))

    def close(self) -> None:
        for remote in self.nodes.values():
            remote.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

