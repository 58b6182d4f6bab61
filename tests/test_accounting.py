"""``coordinator acct``: what each attempt used, counted by its runner over the whole process
tree (real workers, real scripts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli
from test_reliability import Bench, make_bench

from coordinator import JobState, submit


@pytest.fixture()
def bench(tmp_path: Path) -> Iterator[Bench]:
    with make_bench(tmp_path, ["rig-a", "rig-b"]) as made:
        yield made


def test_acct_accounts_for_every_attempt_of_the_whole_process_tree(bench: Bench) -> None:
    jobs = [bench.job("burn", "rig-a", "--burn", 0.6, "--allocate", 120),
            bench.job("flaky", "rig-b", "--fail-attempts", 1, retries=1, retry_delay=0.1),
            bench.job("slow", "rig-b", "--sleep", 60, timeout=1, retries=0)]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url)
    status = run.wait(timeout=90)
    states = {job.job_id: job.state for job in status.jobs}
    assert states == {"burn": JobState.SUCCEEDED, "flaky": JobState.SUCCEEDED,
                      "slow": JobState.FAILED}
    env = {"SC_BROKER_URL": bench.server.url}
    result = run_cli("acct", run.id, "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(row["job_id"], row["attempt"]) for row in rows] == \
        [("burn", 1), ("flaky", 1), ("flaky", 2), ("slow", 1)]
    burn, flaky_1, flaky_2, slow = rows
    # The CPU was burnt by a child of the script: counted, since the runner reaps the tree.
    assert burn["cpu_s"] >= 0.6 and burn["max_rss_mb"] >= 120
    assert burn["elapsed_s"] >= burn["cpu_s"] - 0.2 and burn["exit_code"] == 0
    assert burn["node"] == "rig-a" and burn["gpu"] == 0 and burn["host"].startswith("rig-a@")
    assert flaky_1["exit_code"] == 1 and flaky_2["exit_code"] == 0
    assert flaky_1["max_rss_mb"] > 0 and flaky_1["max_rss_mb"] < burn["max_rss_mb"]
    # Killed by its timeout: the runner still counted what the tree had used.
    assert slow["exit_code"] is None and slow["signal"] == 9 and slow["cpu_s"] is not None
    assert 1 <= slow["elapsed_s"] < 30
    table = run_cli("acct", run.id, env=env).stdout.splitlines()
    assert table[0].split() == ["JOB", "ATT", "NODE", "GPU", "START", "ELAPSED", "CPU",
                                "MAXRSS", "EXIT"]
    assert table[1].split()[:4] == ["burn", "1", "rig-a", "0"] and table[1].endswith(" 0")
    assert table[4].endswith("signal 9")
    # The same fields travel in status --json and run_summary.json (each job's history).
    status_json = json.loads(run_cli("status", run.id, "--json", env=env).stdout)
    history = {job["job_id"]: job["history"] for job in status_json["jobs"]}
    assert history["burn"][0]["cpu_s"] == burn["cpu_s"]
    summary = run.summary(workdir=bench.workdir)
    attempts = {job["job_id"]: job for job in summary["jobs"]}["flaky"]
    assert "max_rss_mb" in json.dumps(attempts)
