"""``coordinator acct``: what each attempt used, counted by its runner over the whole process
tree (real workers, real scripts)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, run_cli
from test_reliability import Bench, make_bench
from waiting import wait_for

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
    # Peak GPU memory needs NVML and a GPU: none here, so none is claimed.
    assert burn["gpu_mem_mb"] is None
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


def test_log_prints_a_jobs_log_one_attempt_of_it_or_follows_it(bench: Bench) -> None:
    gate = bench.workdir / "gate"
    run = submit([bench.job("flaky", "rig-a", "--fail-attempts", 1, retries=1,
                            retry_delay=0.1),
                  bench.job("slow", "rig-b", "--sleep", 60, "--until", gate)],
                 output_dir="o", broker_url=bench.server.url)
    env = {"SC_BROKER_URL": bench.server.url}
    wait_for(lambda: len(bench.ledger_of("slow")) == 1, 30, "slow to start")
    following = subprocess.Popen([str(BIN / "coordinator"), "log", run.id, "slow", "--follow"],
                                 env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "flaky" in {job.job_id for job in run.status().jobs
                                     if job.state is JobState.SUCCEEDED}, 60, "flaky to end")
        whole = run_cli("log", run.id, "flaky", env=env)
        assert whole.returncode == 0, whole.stderr
        assert "attempt 1 of flaky fails on purpose" in whole.stdout
        assert "attempt 1 of flaky on rig-a@" in whole.stdout
        assert "attempt 2 of flaky on rig-a@" in whole.stdout
        second = run_cli("log", run.id, "flaky", "--attempt", "2", env=env).stdout
        assert second.startswith("[scripts-coordinator] attempt 2 of flaky on rig-a@")
        assert "fails on purpose" not in second and "succeeded in" in second
        missing = run_cli("log", run.id, "flaky", "--attempt", "3", env=env)
        assert missing.returncode == 2
        assert missing.stderr.strip().endswith(f"job flaky of run {run.id} has no attempt 3 "
                                               f"in its log")
        assert run_cli("log", run.id, "nope", env=env).returncode == 2
        gate.touch()  # slow ends: --follow prints its last lines and returns by itself
        out, _ = following.communicate(timeout=60)
    finally:
        following.kill()
    assert following.returncode == 0
    assert "attempt 1 of slow on rig-b@" in out and "succeeded in" in out
