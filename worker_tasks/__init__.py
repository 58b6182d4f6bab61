"""Worker side: the Celery app and the task that runs one script job.

Start a node's worker with ``celery -A worker_tasks worker -Q node.<node> ...``
(or ``coordinator worker --node <node>``). This package never imports the
head node's code.
"""

from worker_tasks import control  # noqa: F401  (refuses pool_grow, autoscale, add_consumer)
from worker_tasks.app import app
from worker_tasks.run_job import run_job

__all__ = ["app", "run_job"]
