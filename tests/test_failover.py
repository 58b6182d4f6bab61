"""A broker that fails over: the master SIGKILLed mid-run and never restarted, Sentinel
promotes the replica, and the run completes by itself, every job succeeded exactly once.

The jobs run ``tests/probe_job.py`` (its own ledger of executions, a lock per job and per
node), so "exactly once" and "one job of a node at a time" are the script's own word.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator import JobState, get_run, submit
from coordinator.local import LocalCluster
from coordinator.run import recent_runs
from tests.helpers import BIN, REPO, run_cli
from tests.sentinels import SentinelGroup
from tests.test_observe import metric
from tests.waiting import wait_for

NODES = ["rig-a", "rig-b", "rig-c", "rig-d"]
# Jobs in the run: enough that the failover lands with most of them still to run.
JOBS = 200
# Unacknowledged jobs come back after this many seconds.
VISIBILITY_S = 8


@pytest.fixture()
def ha(tmp_path: Path) -> Iterator[tuple[SentinelGroup, LocalCluster, Path]]:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    with SentinelGroup() as group, LocalCluster(
            NODES, scripts_dir=REPO, workdir=tmp_path, log_dir=tmp_path / "worker-logs",
            broker_url=group.url,
            extra_env={"SC_VISIBILITY_TIMEOUT": str(VISIBILITY_S),
                       "SC_RESTORE_INTERVAL": "1"}) as cluster:
        yield group, cluster, ledger


def probe_jobs(ledger: Path, count: int = JOBS) -> list[dict[str, Any]]:
    return [{"job_id": f"j{index:03d}", "script": "tests/probe_job.py",
             "node": NODES[index % len(NODES)],
             "args": ["--ledger", str(ledger), "--output-file", f"o/j{index:03d}.json",
                      "--sleep", "0.05"]} for index in range(count)]


def successes(ledger: Path, job_id: str) -> int:
    path = ledger / f"{job_id}.ledger"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if line.split()[:1] == ["end"] and line.split()[2] == "0")


def executions(ledger: Path, job_id: str) -> int:
    path = ledger / f"{job_id}.ledger"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if line.startswith("start "))


def finished(ledger: Path) -> int:
    return sum(successes(ledger, f"j{index:03d}") for index in range(JOBS))


def waiter(tmp_path: Path, group: SentinelGroup, run_id: str) -> subprocess.Popen[bytes]:
    """``coordinator wait RUN`` against the Sentinels, output in files."""
    env = {**os.environ, "SC_BROKER_URL": group.url, "SC_RECONNECT_TIMEOUT": "120"}
    return subprocess.Popen(
        [str(BIN / "coordinator"), "wait", run_id, "--workdir", str(tmp_path)], cwd=tmp_path,
        stdout=(tmp_path / "wait.out").open("w"), stderr=(tmp_path / "wait.err").open("w"),
        env=env)


def assert_each_job_succeeded_once(tmp_path: Path, ledger: Path, run_id: str,
                                   url: str) -> None:
    status = get_run(run_id, url).status()
    assert {job.state for job in status.jobs} == {JobState.SUCCEEDED}
    assert len(status.jobs) == JOBS
    for index in range(JOBS):
        job_id = f"j{index:03d}"
        assert successes(ledger, job_id) == 1, (job_id, executions(ledger, job_id))
        assert executions(ledger, job_id) == 1, job_id
        assert (tmp_path / "o" / f"{job_id}.json.done").exists()
    violations = ledger / "violations"
    assert not violations.exists(), violations.read_text()


def test_a_run_completes_when_its_master_dies_for_good(
        ha: tuple[SentinelGroup, LocalCluster, Path], tmp_path: Path) -> None:
    group, cluster, ledger = ha
    first_master = group.master.port
    # Metrics name the master and its replica's lag (then the promoted replica, below).
    before = broker_metrics(group, tmp_path)
    assert metric(before, "sc_broker_master", address=f"127.0.0.1:{first_master}",
                  role="master") == 1
    assert metric(before, "sc_broker_replicas") == 1
    assert metric(before, "sc_broker_replica_lag_seconds",
                  replica=f"127.0.0.1:{group.replica.port}") is not None
    run = submit(probe_jobs(ledger), output_dir="o", broker_url=group.url)
    process = waiter(tmp_path, group, run.id)
    try:
        wait_for(lambda: finished(ledger) >= 30, 120, "the first jobs to finish")
        group.master.kill()  # SIGKILL, never restarted
        wait_for(lambda: group.master_port() not in (None, first_master), 30,
                 "Sentinel to promote the replica")
        assert finished(ledger) < JOBS - 40, "the failover came too late to prove anything"
        process.wait(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = (tmp_path / "wait.out").read_text()
    err = (tmp_path / "wait.err").read_text()
    assert process.returncode == 0, out + err
    assert f"{JOBS}/{JOBS} succeeded" in out, out + err
    assert_each_job_succeeded_once(tmp_path, ledger, run.id, group.url)
    after = broker_metrics(group, tmp_path)
    assert metric(after, "sc_broker_master", address=f"127.0.0.1:{group.replica.port}",
                  role="master") == 1
    assert metric(after, "sc_broker_replicas") == 0


def broker_metrics(group: SentinelGroup, tmp_path: Path) -> str:
    textfile = tmp_path / "sc.prom"
    result = run_cli("metrics", "--textfile", str(textfile), env={"SC_BROKER_URL": group.url})
    assert result.returncode == 0, result.stderr
    return textfile.read_text()


@pytest.fixture()
def pair(tmp_path: Path) -> Iterator[tuple[LocalCluster, Path, Path]]:
    """Two nodes on a private Redis, the probe's ledger, and a 40-job jobs file."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    jobs = [{"job_id": f"h{index:02d}", "script": "tests/probe_job.py",
             "node": ("rig-a", "rig-b")[index % 2],
             "args": ["--ledger", str(ledger), "--output-file", f"o/h{index:02d}.json",
                      "--sleep", "0.2"]} for index in range(HEAD_JOBS)]
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    with LocalCluster(["rig-a", "rig-b"], scripts_dir=REPO, workdir=tmp_path,
                      log_dir=tmp_path / "worker-logs") as cluster:
        yield cluster, ledger, jobs_file


# Jobs in the head-node tests.
HEAD_JOBS = 40


def head_command(cluster: LocalCluster, jobs_file: Path, *extra: str) -> subprocess.Popen[str]:
    """The original command line, as the pipeline runs it, from the jobs file's directory."""
    return subprocess.Popen(
        [str(BIN / "scripts-coordinator"), "--jobs-file", jobs_file.name, "--output-dir", "o",
         *extra], cwd=jobs_file.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "SC_BROKER_URL": cluster.broker_url})


def killed_mid_run(cluster: LocalCluster, ledger: Path, jobs_file: Path) -> str:
    """Start the head's command, SIGKILL it once a few jobs are done; the run's id."""
    head = head_command(cluster, jobs_file)
    assert head.stdout is not None
    run_id = head.stdout.readline().strip()  # printed as soon as the run is published
    wait_for(lambda: sum(successes(ledger, f"h{index:02d}") for index in range(HEAD_JOBS))
             >= 6, 60, "the first jobs to finish")
    head.kill()
    head.communicate(timeout=30)
    return run_id


def assert_head_jobs_ran_once(ledger: Path, tmp_path: Path) -> None:
    for index in range(HEAD_JOBS):
        job_id = f"h{index:02d}"
        assert executions(ledger, job_id) == 1, job_id
        assert successes(ledger, job_id) == 1, job_id
        assert (tmp_path / "o" / f"{job_id}.json.done").exists()
    assert not (ledger / "violations").exists()


def test_a_head_node_killed_mid_run_is_finished_by_wait_from_a_new_process(
        pair: tuple[LocalCluster, Path, Path], tmp_path: Path) -> None:
    cluster, ledger, jobs_file = pair
    run_id = killed_mid_run(cluster, ledger, jobs_file)
    # The workers go on without the head node; a new process picks the run up and collects.
    waited = subprocess.run([str(BIN / "coordinator"), "wait", run_id], cwd=tmp_path,
                            capture_output=True, text=True, timeout=180,
                            env={**os.environ, "SC_BROKER_URL": cluster.broker_url})
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert f"{HEAD_JOBS}/{HEAD_JOBS} succeeded" in waited.stdout
    assert json.loads((tmp_path / "o" / "run_summary.json").read_text())["succeeded"] == \
        HEAD_JOBS
    assert_head_jobs_ran_once(ledger, tmp_path)


def test_the_original_command_started_again_resumes_its_run(
        pair: tuple[LocalCluster, Path, Path], tmp_path: Path) -> None:
    cluster, ledger, jobs_file = pair
    run_id = killed_mid_run(cluster, ledger, jobs_file)
    again = head_command(cluster, jobs_file)
    out, err = again.communicate(timeout=180)
    assert again.returncode == 0, out + err
    assert f"resuming run {run_id}: the same jobs and output directory" in err
    assert f"{HEAD_JOBS}/{HEAD_JOBS} succeeded" in out
    assert [run.id for run in recent_runs(10, cluster.broker_url)] == [run_id]  # no second run
    assert_head_jobs_ran_once(ledger, tmp_path)
    # Once the run is over, the same command is a new run (whose jobs are all done already).
    later = head_command(cluster, jobs_file, "--new-run")
    out, err = later.communicate(timeout=120)
    assert later.returncode == 0, out + err
    assert "resuming" not in err
    assert len(recent_runs(10, cluster.broker_url)) == 2


def test_a_failover_while_a_run_is_published_loses_no_job(
        ha: tuple[SentinelGroup, LocalCluster, Path], tmp_path: Path) -> None:
    """The master dies as soon as the first batch is queued (batches of one job, so the
    rest are still being published): the publisher waits for the promoted replica and
    goes on; ``wait`` publishes again any job whose message the dead master took along."""
    group, cluster, ledger = ha
    jobs_file = tmp_path / "jobs.json"
    jobs_file.write_text(json.dumps(probe_jobs(ledger)))
    master = redis.Redis(port=group.master.port)
    env = {**os.environ, "SC_BROKER_URL": group.url, "SC_PUBLISH_BATCH": "1",
           "SC_RECONNECT_TIMEOUT": "120"}
    head = subprocess.Popen(
        [str(BIN / "scripts-coordinator"), "--jobs-file", jobs_file.name, "--output-dir", "o"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        def first_batch_queued() -> bool:
            return any(master.llen(f"node.{node}") for node in NODES)

        wait_for(first_batch_queued, 60, "the first batch to be queued", every=0.001)
        group.master.kill()
        out, err = head.communicate(timeout=300)
    finally:
        if head.poll() is None:
            head.kill()
            head.communicate()
    assert head.returncode == 0, out + err
    assert "the broker failed over while publishing" in err, err
    published_before = re.search(r"\): (\d+) jobs published before", err)
    assert published_before, err
    assert 0 < int(published_before[1]) < JOBS - 20, err  # the failover landed mid-publish
    assert f"{JOBS}/{JOBS} succeeded" in out, out + err
    run_id = out.splitlines()[0].strip()
    assert_each_job_succeeded_once(tmp_path, ledger, run_id, group.url)
