"""Worker side: the Celery app and the task that runs one script job.

Start a node's worker with ``celery -A worker_tasks worker -Q node.<node> ...``
(or ``coordinator worker --node <node>``). This package never imports the
head node's code. Importing it is cheap: the app with its task and hooks
(``worker.py``) loads on first use of ``worker_tasks.app``, which is also where
``celery -A worker_tasks`` finds it.
"""

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from worker_tasks import worker

        globals()["app"] = worker.app  # no submodule is named app: this binding stays
        return worker.app
    raise AttributeError(f"module 'worker_tasks' has no attribute {name!r}")
