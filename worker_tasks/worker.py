"""The worker assembled: the Celery app, the job task, and the hooks a worker process runs.

``celery -A worker_tasks worker`` finds the app through the package (``worker_tasks.app``
loads this module on first use; the app itself is made in ``celery_app.py``), so importing
``worker_tasks.spec`` or the zygote stays free of Celery.
"""

from __future__ import annotations

import os
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from celery.utils.log import get_logger

from worker_tasks import (
    presence,
    shutdown,  # noqa: F401  (a stopping worker exits in bounded time)
    warm,
)
from worker_tasks.celery_app import app
from worker_tasks.run_job import PRIVATE_ENV, run_job

presence.connect_hooks()  # workers keep their nodes' presence in Redis

__all__ = ["app", "run_job"]

logger = get_logger(__name__)
_supervisor: list[warm.Supervisor] = []  # this worker's zygotes, when it runs warm


@worker_init.connect
def load_worker_only_parts(**kwargs: Any) -> None:
    """In a worker (not on the head node): refuse pool_grow, autoscale, add_consumer; with
    ``SC_WARM``, start the zygotes before the pool (its processes inherit where they listen)."""
    from worker_tasks import control  # noqa: F401
    from worker_tasks.signing import Part, register

    register(Part.WORKER)  # its pool processes inherit the serializer and the trust store

    if warm.enabled() and not _supervisor:
        env = {name: value for name, value in os.environ.items() if name not in PRIVATE_ENV}
        _supervisor.extend(warm.start_zygotes(env))


@worker_process_init.connect
def reserve_spares(**kwargs: Any) -> None:
    """In each pool process of a warm worker: its first job's spare runners, asked now."""
    if warm.enabled():
        warm.reserve_ahead()


@worker_ready.connect
def say_signing(**kwargs: Any) -> None:
    from worker_tasks.signing import trust_store, unsigned

    store = trust_store()
    if store:
        logger.info("signing: only jobs signed by a key whose certificate is in %s run here",
                    store)
    else:
        logger.warning("signing off%s: any client of the broker can run jobs here",
                       " (SC_UNSIGNED=1)" if unsigned() else " (no trust store)")


@worker_shutdown.connect
def stop_zygote(**kwargs: Any) -> None:
    for supervisor in _supervisor:
        supervisor.stop()
