"""`coordinator local` stops everything it started: at the end, and on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, REPO, default_sigint, echo_job, write_jobs
from tests.waiting import alive


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found




def test_ctrl_c_stops_redis_workers_and_running_jobs(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.json", [
        echo_job(f"slow_{node}", node, "o", "--sleep", "60") for node in ("rig-a", "rig-b")])
    process = subprocess.Popen([str(BIN / "coordinator"), "local", "--jobs-file", str(jobs),
                                "--scripts-dir", str(REPO)], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        logs = tmp_path / "full_scoring_results" / "logs"
        while time.monotonic() < deadline:  # until both jobs are running
            if len(list(logs.glob("slow_*.log"))) == 2:
                break
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        # A private redis-server, 2 workers with a pool child each, 2 runners, 2 job scripts.
        while time.monotonic() < deadline and len(descendants(process.pid)) < 9:
            time.sleep(0.1)
        started = descendants(process.pid)
        assert len(started) >= 9, started
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "stopped the local cluster: its Redis, workers and running jobs" in stderr
    assert stderr.rstrip().endswith("coordinator: interrupted")
    deadline = time.monotonic() + 10  # (reaping is asynchronous for re-parented processes)
    while time.monotonic() < deadline and any(alive(pid) for pid in started):
        time.sleep(0.1)
    left = [pid for pid in started if alive(pid)]
    for pid in left:  # clean up before failing, so nothing outlives the test
        os.kill(pid, signal.SIGKILL)
    assert left == []
    assert not list((tmp_path / "full_scoring_results").glob("*.done"))


def test_local_dry_run_starts_nothing(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.json", [echo_job("a", "rig-a")])
    result = subprocess.run([str(BIN / "coordinator"), "local", "--jobs-file", str(jobs),
                             "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0
    assert "dry run: nothing published" in result.stdout
    assert not (tmp_path / "full_scoring_results").exists()


@pytest.mark.parametrize(("jobs", "expected"), [
    ([echo_job("a", "rig-a"), echo_job("a", "rig-b")], "field 'job_id': duplicate"),
    ([echo_job("a", "rig-a"), dict(echo_job("b", "rig-b"), script="nope.py")],
     "job 1 (job_id 'b'): field 'script': 'nope.py' not found in scripts directory"),
])
def test_local_refuses_bad_input_before_starting_anything(tmp_path: Path, jobs: list,
                                                          expected: str) -> None:
    jobs_file = write_jobs(tmp_path / "jobs.json", jobs)
    result = subprocess.run([str(BIN / "coordinator"), "local", "--jobs-file", str(jobs_file),
                             "--scripts-dir", str(REPO)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "full_scoring_results").exists()
