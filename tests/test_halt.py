"""``--halt`` (GNU parallel's meaning), enforced by the workers, with real workers and Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli
from test_reliability import Bench, make_bench
from waiting import alive, wait_for

from coordinator import JobState, submit
from coordinator.run import get_run
from worker_tasks.halt import Halt, HaltSyntaxError


@pytest.fixture()
def bench(tmp_path: Path) -> Iterator[Bench]:
    with make_bench(tmp_path, ["rig-a", "rig-b"]) as made:
        yield made


def final_jobs(run_id: str, url: str, timeout: float = 90) -> dict[str, object]:
    run = get_run(run_id, broker_url=url)
    wait_for(lambda: run.status().finished, timeout, f"run {run_id} to end")
    return {job.job_id: job for job in run.status().jobs}


def test_halt_soon_starts_no_job_once_enough_failed_and_lets_running_ones_finish(
        bench: Bench) -> None:
    jobs = [bench.job("f1", "rig-a", "--fail-attempts", 9),
            bench.job("f2", "rig-b", "--fail-attempts", 9)]
    jobs += [bench.job(f"{node[-1]}{index}", node, "--sleep", 1)
             for index in range(4) for node in ("rig-a", "rig-b")]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url, halt="soon,fail=2")
    done = final_jobs(run.id, bench.server.url)
    states = {job_id: job.state for job_id, job in done.items()}
    assert states["f1"] is JobState.FAILED and states["f2"] is JobState.FAILED
    cancelled = [job_id for job_id, state in states.items() if state is JobState.CANCELLED]
    assert cancelled, states
    for job_id in cancelled:  # never started, the reason on each
        assert bench.ledger_of(job_id) == []
        assert done[job_id].error.startswith("halted (--halt soon,fail=2): 2 of ")
    for job_id, state in states.items():  # a job that had started finished
        if bench.ledger_of(job_id) and job_id not in ("f1", "f2"):
            assert state is JobState.SUCCEEDED
    env = {"SC_BROKER_URL": bench.server.url}
    assert run_cli("wait", run.id, env=env, cwd=bench.workdir).returncode == 1
    collected = run_cli("collect", run.id, "--workdir", str(bench.workdir), env=env)
    assert "halted (--halt soon,fail=2)" in collected.stdout
    status = json.loads(run_cli("status", run.id, "--json", env=env).stdout)
    assert {job["error"] for job in status["jobs"] if job["state"] == "cancelled"} == \
        {done[cancelled[0]].error}


def test_halt_now_kills_the_running_jobs_and_leaves_no_process(bench: Bench) -> None:
    jobs = [bench.job("quick_fail", "rig-a", "--sleep", 1, "--fail-attempts", 9),
            bench.job("long", "rig-b", "--sleep", 60, "--child-sleep", 60),
            bench.job("later", "rig-a")]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url, halt="now,fail=1")
    done = final_jobs(run.id, bench.server.url)
    assert done["quick_fail"].state is JobState.FAILED
    assert done["long"].state is JobState.CANCELLED and done["later"].state is JobState.CANCELLED
    assert done["long"].error == "halted (--halt now,fail=1): 1 of 1 ended jobs failed"
    script_pid = int(bench.ledger_of("long")[0][2])
    child_pid = int((bench.ledger / "long.children").read_text())
    wait_for(lambda: not alive(script_pid) and not alive(child_pid), 15,
             "the killed job and its child to be gone")
    assert not (bench.workdir / "o" / "long.done").exists()
    assert bench.ledger_of("later") == []


def test_halt_on_success_ends_the_run_well_at_the_first_success(bench: Bench) -> None:
    jobs = [bench.job("fast", "rig-a"), bench.job("slow", "rig-b", "--sleep", 60)]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url, halt="now,success=1")
    done = final_jobs(run.id, bench.server.url)
    assert done["fast"].state is JobState.SUCCEEDED and done["slow"].state is JobState.CANCELLED
    assert run_cli("wait", run.id, env={"SC_BROKER_URL": bench.server.url},
                   cwd=bench.workdir).returncode == 0


@pytest.mark.parametrize(("text", "counts", "reached"), [
    ("soon,fail=3", {JobState.FAILED: 2, JobState.SUCCEEDED: 9}, False),
    ("soon,fail=3", {JobState.FAILED: 3}, True),
    ("now,fail=50%", {JobState.FAILED: 1, JobState.SUCCEEDED: 1}, False),  # 2 ended: too few
    ("now,fail=50%", {JobState.FAILED: 2, JobState.SUCCEEDED: 2, JobState.QUEUED: 9}, True),
    ("now,fail=50%", {JobState.FAILED: 1, JobState.SUCCEEDED: 2}, False),
    ("now,fail=34%", {JobState.FAILED: 1, JobState.SUCCEEDED: 2}, False),
    ("now,fail=33%", {JobState.FAILED: 1, JobState.SUCCEEDED: 2}, True),
    ("soon,success=2", {JobState.SUCCEEDED: 1, JobState.SKIPPED: 5}, False),
    ("soon,success=100%", {JobState.SUCCEEDED: 3}, True),
])
def test_a_halt_is_reached_as_gnu_parallel_reads_it(text: str, counts: dict[JobState, int],
                                                    reached: bool) -> None:
    assert Halt.parse(text).reached(counts) is reached
    assert Halt.parse(text).text() == text


@pytest.mark.parametrize(("text", "expected"), [
    ("later,fail=1", "--halt 'later,fail=1': give now|soon,fail=N|P% or now|soon,success=N|P%, "
                     "e.g. --halt soon,fail=3"),
    ("now,fail=0", "--halt 'now,fail=0': the count is at least 1"),
    ("now,fail=0%", "--halt 'now,fail=0%': a percentage is 1% to 100%"),
    ("soon,success=101%", "--halt 'soon,success=101%': a percentage is 1% to 100%"),
    ("soon", "--halt 'soon': give now|soon,fail=N|P% or now|soon,success=N|P%, e.g. --halt "
             "soon,fail=3"),
])
def test_a_bad_halt_is_one_line_and_exit_2(text: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(HaltSyntaxError) as raised:
        Halt.parse(text)
    assert str(raised.value) == expected
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"job_id": "j", "script": "s.py", "node": "rig-a"}]))
    result = run_cli("submit", "--jobs-file", str(path), "--halt", text, "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == f"coordinator: error: {expected}"
