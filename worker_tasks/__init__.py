"""Worker side: the Celery app and the task that runs one script job.

Start a node's worker with ``celery -A worker_tasks worker -Q node.<node> ...``
(or ``coordinator worker --node <node>``). This package never imports the
head node's code. Importing it is cheap: the app and its task (``worker.py``)
load on first use of ``worker_tasks.app`` or ``worker_tasks.run_job``.
"""

from typing import Any

__all__ = ["app", "run_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker_tasks import worker

        # Bound here once: importing the submodule worker_tasks.app would otherwise leave
        # the module, not the Celery app, under that name.
        globals().update(app=worker.app, run_job=worker.run_job)
        return globals()[name]
    raise AttributeError(f"module 'worker_tasks' has no attribute {name!r}")
