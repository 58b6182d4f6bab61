"""Admission: which messages a worker lets Celery see (signed jobs, for this worker).

Every worker takes only task messages of Celery's protocol 2: a ``task`` and an ``id``
header, and a body of ``[args, kwargs, options]``. Celery unpacks that body outside any of
its error handling, so a hand-made message of another shape ended the worker
("Unrecoverable error"): anyone who can write to the broker could stop it with one ``LPUSH``.

A worker given a trust store runs only messages signed by a trusted key, for the task that
runs jobs, for a queue it consumes, under the task id they were signed with; every other one
is refused in one line before Celery decodes it (``worker_tasks.consumer`` calls ``admit``).
"""

from __future__ import annotations

from typing import Any

from worker_tasks.keys import SigningError, trust_store
from worker_tasks.signing import SIGNED_CONTENT_TYPE, reload_if_changed


def admit(message: Any, queues: set[str]) -> str | None:
    """Why this worker refuses ``message`` before Celery sees it, or None to take it.

    With a trust store: the message must be signed by a trusted key, for the task that
    runs jobs, for a queue this worker consumes, under the task id it was signed with. An
    admitted message's body is replaced by the verified JSON: its pool process, forked
    before the trust store last changed, decodes it without verifying again.
    """
    store = trust_store()
    content_type = getattr(message, "content_type", None)
    if store is None:
        if content_type == SIGNED_CONTENT_TYPE:
            return ("signed, and this worker has no trust store to verify it: start it with "
                    "--trusted-certs DIR (cluster deploy installs the head's certificate)")
        try:
            body = message.decode()
        except Exception:  # Celery's own decoding refuses it, in one line (on_decode_error)
            return None
        return shape_refusal(message, body)
    from worker_tasks.spec import RUN_JOB_TASK

    try:
        reload_if_changed(store)
    except SigningError as err:  # a bad file dropped into the store: nothing verifies
        return f"the trust store cannot be read ({err})"
    if content_type != SIGNED_CONTENT_TYPE:
        return f"not signed (content type {content_type}): only signed jobs run here"
    try:
        body = message.decode()
    except Exception as err:  # celery's SecurityError and whatever a forged body raises
        return f"its signature does not verify: {err}"
    refusal = shape_refusal(message, body)
    if refusal is not None:
        return refusal
    headers = getattr(message, "headers", None) or {}
    if headers.get("task") != RUN_JOB_TASK:
        return f"signed, but for task {headers.get('task')!r}, not {RUN_JOB_TASK}"
    job = body[0][0] if isinstance(body, list | tuple) and body and body[0] else None
    if not isinstance(job, dict):
        return "signed, but its body holds no job"
    if job.get("task_id") != headers.get("id"):
        return f"signed for task id {job.get('task_id')!r}, sent as {headers.get('id')!r}"
    from worker_tasks.spec import InvalidMessage, JobSpec

    try:
        queue = JobSpec.from_message(job).queue
    except InvalidMessage as err:
        return f"signed, but not a valid job: {err}"
    if queue not in queues:
        return f"signed for queue {queue}, which this worker does not consume (re-routed)"
    from kombu.serialization import dumps

    message.content_type, message.content_encoding, message.body = dumps(body, "json")
    return None


def shape_refusal(message: Any, body: Any) -> str | None:
    """Why ``message`` is no task message of Celery's protocol 2 (see the module docstring),
    or None."""
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict) or not headers.get("task") or not headers.get("id"):
        return "not a task message (no task and id headers)"
    if not (isinstance(body, list | tuple) and len(body) == 3
            and isinstance(body[0], list | tuple) and isinstance(body[1], dict)
            and isinstance(body[2], dict)):
        return "its body is not a task's [args, kwargs, options]"
    return None
