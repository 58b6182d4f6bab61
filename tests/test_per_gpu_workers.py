"""A node's per-GPU workers on one machine: started one per GPU, seen and stopped together.

``coordinator worker --gpu K --detach`` is what ``cluster up --per-gpu`` runs on a node;
``--status`` and ``--stop`` without ``--gpu`` act on every worker of the node there.
Real workers on the suite's Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import JobState, submit
from coordinator.redis_server import RedisServer
from tests.helpers import echo_job, run_cli, write_jobs
from tests.waiting import wait_for

NODE = "rig-pg"


@pytest.fixture()
def node_args(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[str]]:
    """The worker flags of one node under ``tmp_path``; every worker of it stopped after."""
    args = ["worker", "--node", NODE, "--workdir", str(tmp_path), "--broker", redis_server.url]
    yield args
    run_cli(*args, "--stop", "--now")


def test_a_warm_stop_of_the_node_signals_every_gpu_worker_before_waiting(
        node_args: list[str], redis_server: RedisServer, tmp_path: Path) -> None:
    for gpu in ("0", "1"):
        started = run_cli(*node_args, "--gpu", gpu, "--detach")
        assert started.returncode == 0, started.stderr
        assert f"started worker {NODE}.gpu{gpu}@" in started.stdout
    status = json.loads(run_cli(*node_args, "--status").stdout)
    assert [(w["slot"], w["alive"]) for w in status["workers"]] == [
        (f"{NODE}.gpu0", True), (f"{NODE}.gpu1", True)]
    assert status["engine"]  # the node's best scoring engine, in one line
    # GPU 0 runs a long job; GPU 1 a short one with a second one queued behind it.
    jobs = [echo_job("long", NODE, "o", "--sleep", "6", gpu_id=0),
            echo_job("short", NODE, "o", "--sleep", "3", gpu_id=1),
            echo_job("after_stop", NODE, "o", gpu_id=1)]
    run = submit(jobs, output_dir="o", workdir=tmp_path, per_gpu=True,
                 broker_url=redis_server.url)
    wait_for(lambda: [job.state for job in run.status().jobs][:2] == [JobState.RUNNING] * 2,
             60, "both GPUs to run a job")
    stopped = run_cli(*node_args, "--stop")
    assert stopped.returncode == 0, stopped.stderr
    lines = stopped.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"{NODE}.gpu0", f"{NODE}.gpu1"]
    assert "(warm: its running job finished first)" in lines[0], lines
    states = {job.job_id: job.state for job in run.status().jobs}
    # Both were told at once: GPU 1 finished its job and took no other while GPU 0 finished.
    assert states == {"long": JobState.SUCCEEDED, "short": JobState.SUCCEEDED,
                      "after_stop": JobState.QUEUED}, states
    assert not (tmp_path / "o" / "after_stop.json.done").exists()
    again = run_cli(*node_args, "--stop")
    assert again.returncode == 0 and again.stdout.strip() == "not running"


def test_per_node_and_per_gpu_workers_of_one_node_refuse_each_other(
        node_args: list[str]) -> None:
    assert run_cli(*node_args, "--detach").returncode == 0
    refused = run_cli(*node_args, "--gpu", "0", "--detach")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (f"node {NODE}.gpu0 is already served by {NODE}@" in refused.stderr and
            "per-node and per-GPU workers of one node would run jobs on the same GPUs at "
            "once" in refused.stderr), refused.stderr
    assert run_cli(*node_args, "--stop").returncode == 0
    assert run_cli(*node_args, "--gpu", "1", "--detach").returncode == 0
    refused = run_cli(*node_args, "--detach")
    assert refused.returncode == 2 and f"already served by {NODE}.gpu1@" in refused.stderr
    # Another GPU of the node is no conflict.
    assert run_cli(*node_args, "--gpu", "0", "--detach").returncode == 0


def test_submit_says_when_the_nodes_workers_are_of_the_other_kind(
        redis_server: RedisServer, tmp_path: Path) -> None:
    node = "rig-pg-kind"  # a node of its own: no other test's worker is listed for it
    node_args = ["worker", "--node", node, "--workdir", str(tmp_path), "--broker",
                 redis_server.url]
    try:
        other_kind(node, node_args, redis_server, tmp_path)
    finally:
        run_cli(*node_args, "--stop", "--now")


def other_kind(node: str, node_args: list[str], redis_server: RedisServer,
               tmp_path: Path) -> None:
    """Whole-node jobs on a node served by a GPU's worker, then a GPU nobody serves."""
    assert run_cli(*node_args, "--gpu", "0", "--detach").returncode == 0
    jobs = write_jobs(tmp_path / "jobs.json", [echo_job("whole", node, "w"),
                                               echo_job("second_gpu", node, "w", gpu_id=1)])
    broker = ["--broker", redis_server.url, "--workdir", str(tmp_path)]
    whole = run_cli("submit", "--jobs-file", str(jobs), *broker)
    assert whole.returncode == 0, whole.stderr
    # Without --per-gpu both jobs want the whole node, which only per-GPU workers serve.
    assert (f"warning: no worker serves node {node} (queue node.{node}); its 2 jobs wait until "
            f"one starts; the node's workers are per-GPU ({node}.gpu0): submit with --per-gpu"
            ) in whole.stderr, whole.stderr
    per_gpu = run_cli("submit", "--jobs-file", str(jobs), "--per-gpu", *broker)
    assert per_gpu.returncode == 0, per_gpu.stderr
    warnings = [line for line in per_gpu.stderr.splitlines() if "warning" in line]
    assert warnings == [f"coordinator: warning: no worker serves GPU 1 of node {node} (queue "
                        f"node.{node}.gpu1); its 1 jobs wait until one starts: coordinator "
                        f"worker --node {node} --gpu 1 (or coordinator cluster up {node} "
                        f"--per-gpu)"], per_gpu.stderr
    for run_id in (whole.stdout.strip(), per_gpu.stdout.strip()):
        assert run_cli("cancel", run_id, "--broker", redis_server.url).returncode == 0
