"""The cluster in Prometheus' text format: queues, workers, busy time, runs.

Flower's ``/metrics`` knows only what workers report, so a node whose worker
is gone disappears from it, queued jobs and all. These are read from Redis
itself, every queue included:

    sc_queue_length{node, queue}         messages waiting in a node's queue (per GPU too)
    sc_node_workers{node}                workers serving the node (their presence)
    sc_node_running{node}                1 while one of its jobs holds the node's lease
    sc_node_busy_seconds_total{node}     time its jobs have run (attempts, all runs)
    sc_run_jobs{run, state}              jobs of each recent run by state
    sc_unassigned_messages               messages in node.unassigned (nobody consumes it)
    sc_broker_master{address, role}      1, naming the Redis the broker's commands reach
                                         (the master Sentinel names, behind Sentinels)
    sc_broker_replicas                   replicas connected to it
    sc_broker_replica_lag_seconds{replica}   seconds since each replica last confirmed
    sc_broker_replica_behind_bytes{replica}  replication stream it has not confirmed

Serve them (``coordinator metrics --port 9108``) or write them for node_exporter's
textfile collector (``--textfile /var/lib/node_exporter/sc.prom``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import redis

import celeryconfig
from coordinator.cluster_view import ClusterView
from worker_tasks.connections import Replication
from worker_tasks.presence import presence_key
from worker_tasks.spec import node_of_queue, queue_for
from worker_tasks.tracking import (
    JobState,
    busy_key,
    counts_key,
    counts_of,
    run_key,
    runs_key,
)

# Runs reported (the newest): enough for a dashboard, bounded for a Redis of old runs.
RUNS_REPORTED = 50
PRIORITY_SEPARATOR = b"\x06\x16"

HELP = {
    "sc_queue_length": ("gauge", "Messages waiting in a node's queue."),
    "sc_node_workers": ("gauge", "Workers serving the node (seen within 10 s)."),
    "sc_node_running": ("gauge", "1 while a job of the node holds its lease."),
    "sc_node_busy_seconds_total": ("counter", "Seconds the node's jobs have run."),
    "sc_run_jobs": ("gauge", "Jobs of a run by state."),
    "sc_slot_speed": ("gauge", "A slot's speed for a script: the fastest slot's seconds per "
                               "unit of work over its own (1: the fastest)."),
    "sc_slot_seconds_per_unit": ("gauge", "A slot's average seconds per unit of a script's "
                                          "work (EWMA of its succeeded attempts)."),
    "sc_unassigned_messages": ("gauge", "Messages in node.unassigned, which no worker "
                                        "consumes."),
    "sc_broker_master": ("gauge", "1, naming the Redis the broker's commands reach now."),
    "sc_broker_replicas": ("gauge", "Replicas connected to the broker's master."),
    "sc_broker_replica_lag_seconds": ("gauge", "Seconds since the replica last confirmed."),
    "sc_broker_replica_behind_bytes": ("gauge", "Replication stream the replica has not "
                                                "confirmed."),
}


def label(**labels: str) -> str:
    text = ",".join(f'{name}="{str(value).replace(chr(92), "").replace(chr(34), "")}"'
                    for name, value in labels.items())
    return f"{{{text}}}" if text else ""


def node_queues(broker: redis.Redis) -> dict[str, str]:
    """queue -> node, for every ``node.*`` list in the broker (consumed or not)."""
    queues: dict[str, str] = {}
    for raw in broker.scan_iter(match="node.*", count=1000, _type="list"):
        if PRIORITY_SEPARATOR in raw:
            continue
        queue = raw.decode()
        node = node_of_queue(queue)
        if node and queue != celeryconfig.task_default_queue:
            queues[queue] = node
    return queues


def known_nodes(tracking: redis.Redis) -> set[str]:
    """Nodes some worker has announced itself for (the presence registry's keys)."""
    prefix = presence_key("")
    return {raw.decode().removeprefix(prefix)
            for raw in tracking.scan_iter(match=presence_key("*"), count=1000)}


def collect(broker: redis.Redis, tracking: redis.Redis) -> str:
    """Every metric, in Prometheus' text exposition format."""
    samples: dict[str, list[tuple[str, float]]] = {name: [] for name in HELP}
    queues = node_queues(broker)
    nodes = set(queues.values())
    busy = {}
    for node, value in tracking.hgetall(busy_key()).items():
        with contextlib.suppress(ValueError):  # a value edited by hand: no sample
            busy[node.decode(errors="replace")] = float(value)
    nodes |= set(busy) | known_nodes(tracking)
    # A known node's empty queue is a 0, not a missing sample (Redis keeps no empty list).
    for node in nodes - set(queues.values()):
        queues[queue_for(node)] = node
    ordered = sorted(queues.items())
    pipe = broker.pipeline(transaction=False)  # one round trip for every queue
    for queue, _ in ordered:
        pipe.llen(queue)
    for (queue, node), length in zip(ordered, pipe.execute(), strict=True):
        samples["sc_queue_length"].append((label(node=node, queue=queue), length))
    view = ClusterView(tracking)
    served = view.serving(nodes)
    live = view.liveness(nodes)
    for node in sorted(nodes):
        samples["sc_node_workers"].append((label(node=node), len(served.get(node, []))))
        samples["sc_node_running"].append((label(node=node), 1 if live.held(node) else 0))
        samples["sc_node_busy_seconds_total"].append((label(node=node), busy.get(node, 0.0)))
    for run_id in recent_runs(tracking):
        counts = counts_of(tracking.hgetall(counts_key(run_id)))
        for state in JobState:
            samples["sc_run_jobs"].append((label(run=run_id, state=state.value),
                                           counts.get(state, 0)))
    for script, speeds in view.speeds().items():
        for slot, speed in speeds.items():
            samples["sc_slot_speed"].append((label(script=script, slot=slot), speed.speed))
            samples["sc_slot_seconds_per_unit"].append((label(script=script, slot=slot),
                                                        speed.seconds_per_unit))
    samples["sc_unassigned_messages"].append(("", broker.llen(celeryconfig.task_default_queue)))
    replication = Replication.of(broker)
    samples["sc_broker_master"].append(
        (label(address=replication.address, role=replication.role), 1))
    samples["sc_broker_replicas"].append(("", len(replication.replicas)))
    for replica in replication.replicas:
        samples["sc_broker_replica_lag_seconds"].append((label(replica=replica.address),
                                                         replica.lag_s))
        samples["sc_broker_replica_behind_bytes"].append((label(replica=replica.address),
                                                          replica.behind_bytes))
    lines: list[str] = []
    for name, (kind, text) in HELP.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{labels} {value:g}" for labels, value in samples[name]]
    return "\n".join(lines) + "\n"


def recent_runs(tracking: redis.Redis) -> Iterable[str]:
    for raw in tracking.zrevrange(runs_key(), 0, RUNS_REPORTED - 1):
        run_id = raw.decode()
        if tracking.exists(run_key(run_id)):
            yield run_id


def write_textfile(path: Path, text: str) -> None:
    """Whole or not at all, as node_exporter's textfile collector wants."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
