"""Celery settings for scripts-coordinator, read from environment variables.

Every setting has a local-Redis default, so a laptop needs no configuration.

| variable                 | default                      | meaning                              |
|--------------------------|------------------------------|--------------------------------------|
| SC_BROKER_URL            | redis://127.0.0.1:6379/0     | the Redis that holds the node queues |
| SC_RESULT_BACKEND        | same as SC_BROKER_URL        | where task results are kept          |
| SC_VISIBILITY_TIMEOUT    | 43200 (12 h)                 | an unacked job is redelivered after  |
|                          |                              | this many seconds: longer than your  |
|                          |                              | longest job                          |
| SC_RESTORE_INTERVAL      | 60                           | how often (seconds) a worker looks   |
|                          |                              | for jobs past the visibility timeout |
| SC_RESULT_EXPIRES        | 604800 (7 days)              | task results expire after (seconds)  |
| SC_SENTINEL_MASTER       | mymaster                     | the master's name, for URLs that     |
|                          |                              | name Sentinels (sentinel://h:p;...)  |
| SC_SENTINEL_PASSWORD     | (none)                       | the Sentinels' own password          |
"""

from __future__ import annotations

import os

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
# The master's name for sentinel:// URLs (Redis's own example name by default).
DEFAULT_SENTINEL_MASTER = "mymaster"


def sentinel_master_name() -> str:
    """The master Sentinels watch, for every Redis URL that names Sentinels."""
    return os.environ.get("SC_SENTINEL_MASTER") or DEFAULT_SENTINEL_MASTER


def sentinel_password() -> str | None:
    """The Sentinels' own password, where they require one (``requirepass`` in their conf)."""
    return os.environ.get("SC_SENTINEL_PASSWORD") or None


broker_url = os.environ.get("SC_BROKER_URL", DEFAULT_BROKER_URL)
result_backend = os.environ.get("SC_RESULT_BACKEND", broker_url)

# JSON only: a pickle from anyone who can write to the broker would be code execution.
# application/data is Celery's "auth" serializer: JSON signed with the head node's key
# (worker_tasks.signing decides who needs it).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json", "application/data"]
result_accept_content = ["json"]

# A job lost with its worker is delivered again: ack after the job, not before.
task_acks_late = True
task_reject_on_worker_lost = True
# One job at a time per node: the worker reserves nothing beyond the job it runs.
worker_prefetch_multiplier = 1
worker_concurrency = 1

# Flower sees every job (a start is its task-started event; our records say `running`).
worker_send_task_events = True
task_send_sent_event = True
# No STARTED write to the result backend: it comes before the job's own code, which can wait
# for a Redis that is restarting, and it cannot. A job received as Redis crashed then failed
# outside its body and left the worker holding the next message unrun (seen once in the soak).
task_track_started = False

broker_transport_options = {
    "visibility_timeout": int(os.environ.get("SC_VISIBILITY_TIMEOUT", "43200")),
    # Sweep for abandoned jobs every SC_RESTORE_INTERVAL s (kombu's default is ~100 s).
    "unacked_restore_interval": int(os.environ.get("SC_RESTORE_INTERVAL", "60")),
    "unacked_restore_throttle": 1,
    # The sweep's lock outlives a broker crash that catches it held (it is persisted):
    # kombu's 300 s default then holds back every abandoned job for five minutes.
    "unacked_mutex_expire": 30,
    # Read only by kombu's sentinel:// transport (ignored for redis://).
    "master_name": sentinel_master_name(),
}
result_backend_transport_options = {"master_name": sentinel_master_name()}
if sentinel_password():
    broker_transport_options["sentinel_kwargs"] = {"password": sentinel_password()}
    result_backend_transport_options["sentinel_kwargs"] = {"password": sentinel_password()}
# A demoted master answers READONLY (a channel error, not a connection error): the
# worker's consumer then reconnects, through the Sentinels, instead of stopping.
broker_channel_error_retry = True
result_expires = int(os.environ.get("SC_RESULT_EXPIRES", str(7 * 24 * 3600)))

# A broker blip must not kill a running GPU job: it finishes and writes its .done; its
# message comes back after the visibility timeout and is skipped for that marker.
worker_cancel_long_running_tasks_on_connection_loss = False

# Jobs are routed explicitly to node.<node>; nothing goes to a shared default queue.
task_default_queue = "node.unassigned"
broker_connection_retry_on_startup = True
worker_hijack_root_logger = False
