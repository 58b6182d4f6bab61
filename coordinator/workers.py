"""Which workers serve which nodes, asked of the live workers (Celery remote control)."""

from __future__ import annotations

from collections import defaultdict

from celery import Celery

from worker_tasks.spec import queue_for

# How long to collect replies; every worker on a healthy broker answers well within this.
INSPECT_TIMEOUT_S = 1.0
QUEUE_PREFIX = queue_for("")


def workers_by_node(app: Celery, timeout: float = INSPECT_TIMEOUT_S) -> dict[str, list[str]]:
    """node -> names of the workers consuming ``node.<node>`` right now."""
    replies = app.control.inspect(timeout=timeout).active_queues() or {}
    nodes: dict[str, list[str]] = defaultdict(list)
    for worker, queues in replies.items():
        for queue in queues or []:
            name = queue.get("name", "")
            if name.startswith(QUEUE_PREFIX):
                nodes[name.removeprefix(QUEUE_PREFIX)].append(worker)
    return dict(nodes)
