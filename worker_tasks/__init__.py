"""Worker side: the Celery app and the task that runs one script job.

Start a node's worker with ``celery -A worker_tasks worker -Q node.<node> ...``
(or ``coordinator worker --node <node>``). This package never imports the
head node's code.
"""

from typing import Any

from celery.signals import worker_init

from worker_tasks import (
    presence,  # noqa: F401  (workers keep their nodes' presence in Redis)
    shutdown,  # noqa: F401  (a stopping worker exits in bounded time)
)
from worker_tasks.app import app
from worker_tasks.run_job import run_job

__all__ = ["app", "run_job"]


@worker_init.connect
def load_worker_only_parts(**kwargs: Any) -> None:
    """In a worker (not on the head node): refuse pool_grow, autoscale, add_consumer."""
    from worker_tasks import control  # noqa: F401
