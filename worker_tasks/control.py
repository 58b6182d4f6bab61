"""Remote-control commands our workers refuse: those that would run two jobs of a node at once.

Flower's pool "Grow" button, ``celery control pool_grow`` / ``autoscale`` and
``add_consumer`` reach every Celery worker. On ours they would break one job
at a time per node (the node lease would still hold, but the pool would sit
waiting on it), so they answer with an error instead. Shrinking, ping,
inspect, shutdown and the rest stay as Celery made them.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import Panel, nok

REFUSAL = ("refused by scripts-coordinator: a node's worker runs one job at a time "
           "(concurrency 1, one queue)")


@Panel.register(name="pool_grow", type="control", signature="[N=1]", args=[("n", int)])
def pool_grow(state: Any, n: int = 1, **kwargs: Any) -> dict[str, str]:
    """Refused: one job at a time per node."""
    return nok(REFUSAL)


@Panel.register(name="autoscale", type="control", signature="MAX [MIN]",
                args=[("max", int), ("min", int)])
def autoscale(state: Any, max: int | None = None, min: int | None = None,  # noqa: A002
              **kwargs: Any) -> dict[str, str]:
    """Refused: one job at a time per node."""
    return nok(REFUSAL)


@Panel.register(name="add_consumer", type="control",
                signature="<queue> [exchange [type [routing_key]]]",
                args=[("queue", str), ("exchange", str), ("exchange_type", str),
                      ("routing_key", str)])
def add_consumer(state: Any, queue: str | None = None, **kwargs: Any) -> dict[str, str]:
    """Refused: a worker consumes its own node's queue only."""
    return nok(f"{REFUSAL}; it consumes its node's queue only, not {queue!r}")
