"""The worker's message consumer, with refusals told in one log line.

Celery logs a message it will not decode (pickle, a body that is not JSON) or will
not take (a malformed task message) with a traceback and a dump of the body: an
attacker's payload repeated into the log, twenty lines a message. These are
untrusted input refused as designed, so each is one line naming the message and
the reason; the message is acknowledged or rejected exactly as Celery does.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)


def message_id(message: Any) -> str:
    headers = getattr(message, "headers", None) or {}
    return str(headers.get("id") or getattr(message, "delivery_tag", "?"))


class QuietConsumer(Consumer):
    """Celery's consumer; ``on_decode_error`` and ``on_invalid_task`` say one line each."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        logger.error("refused message %s: cannot decode its body (%s, content type %s)",
                     message_id(message), exc, getattr(message, "content_type", "?"))
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        logger.error("refused message %s: %s", message_id(message), exc)
        message.reject_log_error(logger, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)
