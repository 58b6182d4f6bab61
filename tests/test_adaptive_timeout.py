"""``"timeout": "P%"`` and ``--job-timeout``: a job's limit from its run's own median (GNU
parallel's ``--timeout 200%``), with real workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli
from test_reliability import Bench, make_bench

from coordinator import JobState, submit
from worker_tasks.execution import TimeLimit


@pytest.fixture()
def bench(tmp_path: Path) -> Iterator[Bench]:
    with make_bench(tmp_path, ["rig-a"]) as made:
        yield made


def test_a_percentage_timeout_kills_a_job_far_slower_than_the_median(bench: Bench) -> None:
    """Three jobs of about 0.3 s set the median; the fourth would take 60 s and is killed at
    300% of it (at least 1 s), the reason naming the median."""
    jobs = [bench.job(f"quick{index}", "rig-a", "--sleep", 0.3) for index in range(3)]
    jobs.append(bench.job("stuck", "rig-a", "--sleep", 60))
    run = submit(jobs, output_dir="o", broker_url=bench.server.url, job_timeout="300%")
    status = run.wait(timeout=60)
    by_id = {job.job_id: job for job in status.jobs}
    assert all(by_id[f"quick{index}"].state is JobState.SUCCEEDED for index in range(3))
    stuck = by_id["stuck"]
    assert stuck.state is JobState.FAILED
    assert stuck.error.startswith("timed out after ")
    assert "(300% of the median " in stuck.error and " of 3 succeeded jobs of its script)" \
        in stuck.error
    assert stuck.duration_s < 10


def test_before_three_successes_a_percentage_sets_no_limit(bench: Bench) -> None:
    run = submit([bench.job("alone", "rig-a", "--sleep", 1.5, timeout="10%")], output_dir="o",
                 broker_url=bench.server.url)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED


def test_a_percentage_limit_waits_for_its_median_and_names_it() -> None:
    answers: list[tuple[float, int] | None] = [None, (2.0, 3)]
    limit = TimeLimit("150%", lambda: answers.pop(0) if answers else (2.0, 3))
    limit.when_script_starts()
    assert limit.deadline is None and limit.while_running()  # no median yet: no limit
    limit.asked = 0.0  # the next look is due
    assert limit.while_running() and limit.seconds == 3.0
    assert limit.reason() == ("timed out after 3 s (150% of the median 2 s of 3 succeeded "
                              "jobs of its script); killed")
    assert TimeLimit(7.0).reason() == "timed out after 7 s; killed"


def test_the_job_timeout_flag_is_not_the_wait_timeout(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"job_id": "j", "script": "s.py", "node": "rig-a"}]))
    dry = run_cli("submit", "--jobs-file", str(path), "--job-timeout", "200%", "--timeout",
                  "30", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    bad = run_cli("submit", "--jobs-file", str(path), "--job-timeout", "x%", "--dry-run")
    assert bad.returncode == 2
    assert "--job-timeout 'x%'" in bad.stderr
