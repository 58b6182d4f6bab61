"""The Celery application shared by workers and the head node's publisher."""

from __future__ import annotations

from typing import Any

from celery import Celery

import celeryconfig
from worker_tasks.connections import tls_options, uses_tls
from worker_tasks.transport import install as install_transports

# The job task's name (also in spec.RUN_JOB_TASK; repeated to keep this module import-light).
RUN_JOB_TASK = "scripts_coordinator.run_job"


class UnroutedJobError(ValueError):
    """A job published without its node's queue would wait in a queue nobody consumes."""


def refuse_unrouted(name: str, args: Any, kwargs: Any, options: dict[str, Any],
                    task: Any = None, **rest: Any) -> None:
    """Router: a job must name its node's queue; the default queue is refused at the publisher."""
    if name == RUN_JOB_TASK and "queue" not in options and "routing_key" not in options:
        raise UnroutedJobError(f"{name} published without a queue: give queue='node.<node>' "
                               f"(no worker consumes {celeryconfig.task_default_queue})")


def make_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A Celery app configured from ``celeryconfig``; URLs may be overridden."""
    # An item in a queue that is no message is dropped in one line, not fatal to a worker.
    install_transports()
    # Remote control through our mailbox: signed commands and replies (worker_tasks.mailbox).
    app = Celery("scripts_coordinator", control="worker_tasks.mailbox:SignedControl")
    app.config_from_object(celeryconfig)
    # Refused messages are told in one line (see consumer.py); the head's apps consume nothing.
    overrides: dict[str, Any] = {"task_routes": (refuse_unrouted,),
                                 "worker_consumer": "worker_tasks.consumer:QuietConsumer"}
    if broker_url:
        overrides["broker_url"] = broker_url
        overrides["result_backend"] = result_backend or broker_url
    elif result_backend:
        overrides["result_backend"] = result_backend
    app.conf.update(overrides)
    # rediss:// brokers and backends verify the server (worker_tasks.connections).
    if uses_tls(app.conf.broker_url or ""):
        app.conf.broker_use_ssl = tls_options()
    if uses_tls(str(app.conf.result_backend or "")):
        app.conf.redis_backend_use_ssl = tls_options()
    return app


app = make_app()
