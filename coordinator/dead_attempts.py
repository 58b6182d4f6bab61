"""Attempts the head node finds dead: their entry in the job's history, and the task event
that ends them in Flower.

A worker records each attempt it ends. One SIGKILLed with its worker ends nothing, so the
head records the attempt when it notices (the job's lease gone with its worker): an entry
in the job's history (``run_summary.json``, the joblog) and a task event sent under the
dead worker's name, without which Flower shows the attempt STARTED for ever. A job whose
message comes back (requeued) gets ``task-retried``, which the redelivery's own events
override; a job moved elsewhere under a new message gets ``task-failed``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from worker_tasks.tracking import now

logger = logging.getLogger("coordinator")


@dataclass(frozen=True)
class DeadAttempt:
    """One attempt found dead.

    Parameters:
        task_id: its message.
        host: the worker it died with (``rig-a@box``).
        reason: one line, for the history and Flower.
        requeued: its message comes back (else the job moved under a new message).
    """

    task_id: str
    host: str
    reason: str
    requeued: bool


# How the error of a job requeued after its worker died begins (``requeue_error``).
REQUEUED_MARK = "died with its worker"


def requeue_error(job: Any) -> str:
    """The error a requeued job carries until its next attempt (a ``JobRecord``)."""
    where = ("the job is delivered again to the first free node" if job.floating else
             f"the job is delivered again when a worker serves {job.node}")
    placed = f" on {job.node}" if job.floating else ""
    return f"attempt {job.attempts} {REQUEUED_MARK} {job.host}{placed}; {where}"


def requeued_dead(job: Any) -> bool:
    """The job waits because the head requeued it after its worker died (its old attempt is
    in its history, and its message is the same one)."""
    return bool(job.host and job.error and REQUEUED_MARK in job.error.split(";", 1)[0])


def dead_reason(record: Mapping[str, Any]) -> str:
    return (f"attempt {record.get('attempts', 0)} died with its worker "
            f"{record.get('host') or '(unknown)'} (noticed by the head node)")


def history_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """The history entry of a job's running attempt found dead (the record's fields)."""
    return {"attempt": record.get("attempts", 0), "host": record.get("host"),
            "started_at": record.get("started_at"), "finished_at": now(), "exit_code": None,
            "error": dead_reason(record)}


def with_dead_attempt(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The record's history with its dead attempt added (once: not if already there)."""
    history = list(record.get("history") or [])
    number = record.get("attempts", 0)
    if any(entry.get("attempt") == number for entry in history):
        return history  # its worker ended it after all (a retry's wait, say)
    return [*history, history_entry(record)]


def announce(app: Celery | None, attempts: Sequence[DeadAttempt]) -> None:
    """End each attempt in Flower with a task event from the worker it died with."""
    if app is None or not attempts:
        return
    try:
        with app.producer_or_acquire() as producer:
            for attempt in attempts:
                dispatcher = app.events.Dispatcher(producer.connection, hostname=attempt.host,
                                                   enabled=True, buffer_while_offline=False)
                kind = "task-retried" if attempt.requeued else "task-failed"
                dispatcher.send(kind, uuid=attempt.task_id, exception=attempt.reason,
                                traceback=attempt.reason)
                dispatcher.close()
    except Exception as err:  # display only: the records are already right
        logger.warning("could not tell Flower about %d dead attempts: %s", len(attempts), err)
