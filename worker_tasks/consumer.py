"""The worker's message consumer, with refusals told in one log line.

Celery logs a message it will not decode (pickle, a body that is not JSON) or will
not take (a malformed task message) with a traceback and a dump of the body: an
attacker's payload repeated into the log, twenty lines a message. These are
untrusted input refused as designed, so each is one line naming the message and
the reason; the message is acknowledged or rejected exactly as Celery does.

A worker with a trust store takes only jobs signed by a key it trusts
(``worker_tasks.admission.admit``): the others are refused here, before Celery decodes them.

The header fields Celery prints and shows before any check of ours (the task's shown
name, ``shadow``, and its ``id``) are made one printable line first: a hand-made
message could otherwise write lines of its own into the log ("Task ...[...] received").
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer
from vine import promise

from worker_tasks.admission import admit

logger = logging.getLogger(__name__)

# The longest shown name or id a message may carry into the log (the head's are < 200).
MAX_HEADER_CHARS = 300


def one_line(value: Any) -> Any:
    """``value`` if it is one printable line of at most ``MAX_HEADER_CHARS``; else cleaned:
    unprintable characters as ``?``, cut to the limit (a string), or None."""
    if not isinstance(value, str):
        return None
    if value.isprintable() and len(value) <= MAX_HEADER_CHARS:
        return value
    return "".join(char if char.isprintable() else "?" for char in value)[:MAX_HEADER_CHARS]


def clean_headers(message: Any) -> None:
    """Make the shown name and the id one printable line each, in place (untrusted input)."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict):
        return
    if headers.get("shadow") is not None:
        headers["shadow"] = one_line(headers["shadow"])
    if "id" in headers and headers["id"] is not None:
        headers["id"] = one_line(headers["id"]) or "invalid-id"


def message_id(message: Any) -> str:
    headers = getattr(message, "headers", None) or {}
    return str(headers.get("id") or getattr(message, "delivery_tag", "?"))


class QuietConsumer(Consumer):
    """Celery's consumer; ``on_decode_error`` and ``on_invalid_task`` say one line each, and
    every message's shown name and id are cleaned before Celery logs them."""

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            clean_headers(message)
            refusal = admit(message, {queue.name for queue in self.task_consumer.queues})
            if refusal is not None:
                return self.refuse(message, refusal)
            return handle(message)

        return on_task_received

    def refuse(self, message: Any, reason: str) -> None:
        """One line, the message acknowledged (it must not come back), and a task-rejected
        event, so Flower shows it REJECTED; nothing runs."""
        task_id = message_id(message)
        logger.error("refused message %s: %s; nothing run", task_id, reason)
        message.ack()
        dispatcher = getattr(self, "event_dispatcher", None)
        if dispatcher is not None and dispatcher.enabled:
            dispatcher.send("task-rejected", uuid=task_id, requeue=False)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        logger.error("refused message %s: cannot decode its body (%s, content type %s)",
                     message_id(message), exc, getattr(message, "content_type", "?"))
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        logger.error("refused message %s: %s", message_id(message), exc)
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)
