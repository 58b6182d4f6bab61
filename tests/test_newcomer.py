"""What a new user trips on (some of issue 19's list): a finished run relabelled by a late
cancel, a closed pipe reported as an error, a known node's empty queue with no sample."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import redis

from coordinator import JobState, submit
from coordinator.local import LocalCluster
from coordinator.metrics import collect
from tests.helpers import BIN, echo_job, run_cli


def test_cancel_of_a_finished_run_changes_nothing(cluster: LocalCluster,
                                                  cluster_workdir: Path) -> None:
    run = submit([echo_job("late_ok", "rig-a", "late"), echo_job("late_bad", "rig-b", "late",
                                                                  "--exit-code", "2")],
                 output_dir="late", workdir=cluster_workdir, broker_url=cluster.broker_url)
    assert run.wait(timeout=60).finished
    assert run.cancel() == 0
    result = run_cli("cancel", run.id, "--broker", cluster.broker_url)
    assert result.stdout == f"run {run.id}: cancelled 0 queued or running jobs\n"
    status = run.status()
    assert status.outcome == "failed"  # what its jobs did: one failed
    assert {job.job_id: job.state for job in status.jobs} == {
        "late_ok": JobState.SUCCEEDED, "late_bad": JobState.FAILED}
    listed = run_cli("runs", "--limit", "50", "--broker", cluster.broker_url)
    line = next(line for line in listed.stdout.splitlines() if line.startswith(run.id))
    assert line.split()[3] == "failed"


def test_a_closed_pipe_is_a_normal_end(cluster: LocalCluster, cluster_workdir: Path) -> None:
    run = submit([echo_job(f"pipe{index}", "rig-c", "pipe") for index in range(30)],
                 output_dir="pipe", workdir=cluster_workdir, broker_url=cluster.broker_url)
    run.wait(timeout=120)
    # The reader closes its end before the command writes (`coordinator status | head -0`).
    reader, writer = os.pipe()
    os.close(reader)
    process = subprocess.run([str(BIN / "coordinator"), "status", run.id, "--all",
                              "--broker", cluster.broker_url], stdout=writer,
                             stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    os.close(writer)
    assert process.returncode == 0, process.stderr
    assert process.stderr == ""


def test_a_known_nodes_empty_queue_is_a_zero_sample(cluster: LocalCluster) -> None:
    client = redis.Redis.from_url(cluster.broker_url)
    text = collect(client, client)
    for node in ("rig-a", "rig-b", "rig-c", "rig-d"):
        # Live workers, nothing queued: Redis keeps no empty list, the metric says 0.
        assert f'sc_queue_length{{node="{node}",queue="node.{node}"}} 0' in text, text
        assert f'sc_node_workers{{node="{node}"}} 1' in text
