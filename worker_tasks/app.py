"""The Celery application shared by workers and the head node's publisher."""

from __future__ import annotations

from celery import Celery

import celeryconfig


def make_app(broker_url: str | None = None, result_backend: str | None = None) -> Celery:
    """A Celery app configured from ``celeryconfig``; URLs may be overridden."""
    app = Celery("scripts_coordinator")
    app.config_from_object(celeryconfig)
    overrides: dict[str, str] = {}
    if broker_url:
        overrides["broker_url"] = broker_url
        overrides["result_backend"] = result_backend or broker_url
    elif result_backend:
        overrides["result_backend"] = result_backend
    if overrides:
        app.conf.update(overrides)
    return app


app = make_app()
