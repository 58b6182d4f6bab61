"""The head node's one view of who is alive (``coordinator.cluster_view``), against real
workers and Redis, and the per-GPU ``status`` line that used to say "no worker running"."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from coordinator.broker import publisher
from coordinator.cluster_view import ClusterView, Liveness
from coordinator.local import LocalCluster
from coordinator.records import JobRecord
from coordinator.redis_server import RedisServer
from coordinator.run import submit
from tests.helpers import NODES, REPO, echo_job, run_cli
from tests.waiting import wait_for
from worker_tasks.lease import make_token, parse_token, task_of_token
from worker_tasks.spec import node_of_slot, slot_of_queue, slot_of_worker, worker_name
from worker_tasks.tracking import JobState, lease_key

HOST = socket.gethostname()


def test_names_are_built_and_parsed_in_one_place() -> None:
    assert worker_name("rig-a.gpu1", "box") == "rig-a.gpu1@box"
    assert slot_of_worker("rig-a.gpu1@box") == "rig-a.gpu1"
    assert node_of_slot("rig-a.gpu1") == node_of_slot("rig-a") == "rig-a"
    assert slot_of_queue("node.rig-a.gpu1") == "rig-a.gpu1"
    assert slot_of_queue("celery") is None
    token = make_token("rig-a@box", "run.job.3")
    assert parse_token(token)[0] == "rig-a@box"
    assert parse_token(token)[1].isdigit()
    assert task_of_token(token) == "run.job.3"
    assert parse_token("garbage") == ("garbage", "", "")


def test_liveness_knows_an_attempt_only_by_its_lease() -> None:
    live = Liveness(leases={"rig-a": [make_token("rig-a.gpu1@box", "r.j.2")]})
    job = JobRecord(job_id="j", node="rig-a", state=JobState.RUNNING, task_id="r.j.2")
    assert live.running(job)
    assert not live.running(JobRecord(job_id="j", node="rig-a", state=JobState.RUNNING,
                                      task_id="r.j.1"))  # an older message of the same job
    assert not live.running(JobRecord(job_id="j", node="rig-b", state=JobState.RUNNING,
                                      task_id="r.j.2"))
    assert live.held("rig-a") and not live.held("rig-b")


def test_the_view_reads_leases_of_a_node_and_of_its_gpus(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.set(lease_key("rig-lv"), "rig-lv@box/1/r.a.0", px=30_000)
    client.set(lease_key("rig-lw.gpu3"), "rig-lw.gpu3@box/2/r.b.0", px=30_000)
    try:
        live = ClusterView(client).liveness(["rig-lv", "rig-lw", "rig-lx"])
        assert live.leases == {"rig-lv": ["rig-lv@box/1/r.a.0"],
                               "rig-lw": ["rig-lw.gpu3@box/2/r.b.0"]}
    finally:
        client.delete(lease_key("rig-lv"), lease_key("rig-lw.gpu3"))


def test_live_workers_are_seen_by_node_and_by_slot(cluster: LocalCluster) -> None:
    client = redis.Redis.from_url(cluster.broker_url)
    view = ClusterView(client, publisher(cluster.broker_url))
    expected = {node: [worker_name(node, HOST)] for node in NODES}
    # Other tests' workers may share this Redis: look at the cluster's own nodes.
    assert {node: view.consuming_nodes().get(node) for node in NODES} == expected
    assert {node: view.consuming_slots().get(node) for node in NODES} == expected
    assert view.answering() >= {worker_name(node, HOST) for node in NODES}
    assert view.serving(NODES) == expected


@pytest.fixture()
def gpu_workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[LocalCluster]:
    """Two per-GPU workers of one node (what ``worker --node rig-v --gpu 0|1`` starts)."""
    with LocalCluster(["rig-v.gpu0", "rig-v.gpu1"], scripts_dir=REPO, workdir=tmp_path,
                      log_dir=tmp_path / "logs", broker_url=redis_server.url) as running:
        yield running


def test_status_finds_the_per_gpu_workers_of_a_node(gpu_workers: LocalCluster,
                                                    tmp_path: Path) -> None:
    jobs = [echo_job(f"pg{index}", "rig-v", "pg", "--sleep", "60", gpu_id=index % 2)
            for index in range(4)]
    run = submit(jobs, output_dir="pg", workdir=tmp_path, per_gpu=True,
                 broker_url=gpu_workers.broker_url)
    try:
        wait_for(lambda: run.status().counts.get(JobState.RUNNING) == 2, 60,
                 "both GPUs running a job")
        view = ClusterView(run.client, run.app)
        names = [worker_name(f"rig-v.gpu{gpu}", HOST) for gpu in (0, 1)]
        assert view.consuming_nodes()["rig-v"] == names
        slots = view.consuming_slots()
        assert [slots.get(slot) for slot in ("rig-v", "rig-v.gpu0", "rig-v.gpu1")] == [
            None, names[:1], names[1:]]
        result = run_cli("status", run.id, "--no-check", "--broker", gpu_workers.broker_url,
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if "node rig-v" in line)
        assert line.strip() == (f"node rig-v ({', '.join(names)}): 4 jobs: 2 queued, "
                                f"2 running")
        running = [line for line in result.stdout.splitlines() if re.search(r"\brunning\b",
                                                                               line)]
        assert not any("does not answer" in line for line in running)
    finally:
        run.cancel()
        wait_for(lambda: run.status().finished, 30, "the cancelled run to end")
