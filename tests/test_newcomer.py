"""What a new user trips on: results judged from the wrong directory, a finished run
relabelled by a late cancel, a closed pipe reported as an error, a known node's empty queue
with no sample, failure reasons hidden, exit statuses that disagree with the docs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from coordinator import JobState, submit
from coordinator.local import LocalCluster
from coordinator.metrics import collect
from tests.helpers import BIN, REPO, default_sigint, echo_job, run_cli, write_jobs
from tests.waiting import wait_for
from worker_tasks.daemon import session_members


def test_results_are_judged_where_the_workers_wrote_them(
        cluster: LocalCluster, cluster_workdir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    jobs = write_jobs(tmp_path / "jobs.json", [echo_job(f"where{index}", node)
                                              for index, node in enumerate(["rig-a", "rig-b"])])
    # From another directory, no --workdir: the workers' own directory is where to look.
    result = run_cli("submit", "--jobs-file", str(jobs), "--output-dir", "where_cli", "--wait",
                     "--timeout", "120", "--broker", cluster.broker_url, cwd=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 succeeded (100%)" in result.stdout
    written = json.loads((cluster_workdir / "where_cli" / "run_summary.json").read_text())
    assert written["all_succeeded"] and written["succeeded"] == 2
    assert not (elsewhere / "where_cli").exists()
    # The Python API, from another directory, with the workdir the run was submitted with.
    monkeypatch.chdir(elsewhere)
    run = submit(json.loads(jobs.read_text()), output_dir="where_api", workdir=cluster_workdir,
                 broker_url=cluster.broker_url)
    assert run.wait(timeout=120).all_succeeded
    summary = run.summary()
    assert summary["succeeded"] == 2, summary["jobs"]
    assert (cluster_workdir / "where_api" / "run_summary.json").is_file()
    assert not (elsewhere / "where_api").exists()


def test_a_marker_not_where_the_collector_looks_is_unconfirmed(
        cluster: LocalCluster, cluster_workdir: Path, tmp_path: Path) -> None:
    run = submit([echo_job("unseen_a", "rig-a"), echo_job("unseen_b", "rig-b")],
                 output_dir="unseen", workdir=cluster_workdir, broker_url=cluster.broker_url)
    assert run.wait(timeout=120).all_succeeded
    empty = tmp_path / "not_the_volume"
    empty.mkdir()
    result = run_cli("collect", run.id, "--workdir", str(empty), "--broker", cluster.broker_url)
    assert result.returncode == 7, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "UNCONFIRMED" in line]
    assert len(lines) == 2, result.stdout
    for line in lines:  # the path looked at, and where the worker wrote
        assert str(empty / "unseen") in line and str(cluster_workdir.resolve()) in line, line
    summary = json.loads((empty / "unseen" / "run_summary.json").read_text())
    assert summary["counts"]["unconfirmed"] == 2 and summary["counts"]["failed"] == 0
    status = run_cli("status", run.id, "--broker", cluster.broker_url)
    assert "2 succeeded" in status.stdout, status.stdout  # the records are left as they are
    # A job that really failed outranks an unconfirmed one: exit 1.
    mixed = submit([echo_job("seen_ok", "rig-a"), echo_job("seen_bad", "rig-b", "anywhere",
                                                           "--exit-code", "2")],
                   output_dir="unseen2", workdir=cluster_workdir, broker_url=cluster.broker_url)
    mixed.wait(timeout=120)
    again = run_cli("collect", mixed.id, "--workdir", str(empty), "--broker", cluster.broker_url)
    assert again.returncode == 1, again.stdout + again.stderr
    assert "UNCONFIRMED seen_ok" in again.stdout and "FAILED seen_bad" in again.stdout


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


def test_a_failed_jobs_own_reason_is_shown_where_the_user_looks(
        cluster: LocalCluster, cluster_workdir: Path, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.json", [
        echo_job("why_ok", "rig-a", "why"),
        echo_job("why_bad", "rig-b", "why", "--exit-code", "3",
                 "--reason", "ValueError: chunk 7 has no seeds")])
    result = run_cli("submit", "--jobs-file", str(jobs), "--output-dir", "why", "--wait",
                     "--timeout", "120", "--broker", cluster.broker_url, cwd=cluster_workdir)
    assert result.returncode == 1, result.stdout + result.stderr
    table = result.stdout.splitlines()
    failed = next(index for index, line in enumerate(table) if "FAILED why_bad" in line)
    assert "script exited with status 3" in table[failed]
    assert under(table, failed)[-1] == "ValueError: chunk 7 has no seeds"  # under its job
    # The live line says it too, in one line.
    assert ("why_bad failed in" in result.stdout + result.stderr
            and "status 3: ValueError: chunk 7 has no seeds" in result.stdout + result.stderr)
    run_id = result.stdout.splitlines()[0].strip()
    for command in (["status", run_id], ["collect", run_id]):
        shown = run_cli(*command, "--broker", cluster.broker_url, cwd=cluster_workdir)
        lines = shown.stdout.splitlines()
        at = next(index for index, line in enumerate(lines) if "why_bad" in line
                  and "status 3" in line)
        assert under(lines, at)[-1] == "ValueError: chunk 7 has no seeds", shown.stdout


def under(lines: list[str], at: int) -> list[str]:
    """The indented lines right under line ``at`` (a failed job's last output lines)."""
    found = []
    for line in lines[at + 1:at + 3]:
        if not line.startswith("      "):
            break
        found.append(line.strip())
    return found


def test_a_warm_stop_says_whether_a_job_was_running(cluster: LocalCluster,
                                                     tmp_path: Path) -> None:
    args = ["worker", "--node", "rig-stop", "--workdir", str(tmp_path), "--broker",
            cluster.broker_url]
    try:
        assert run_cli(*args, "--detach").returncode == 0
        idle = run_cli(*args, "--stop")
        assert idle.returncode == 0 and "(warm: no job was running)" in idle.stdout, idle.stdout
        assert run_cli(*args, "--detach").returncode == 0
        run = submit([echo_job("stop_busy", "rig-stop", "stop", "--sleep", "3")],
                     output_dir="stop", workdir=tmp_path, broker_url=cluster.broker_url)
        wait_for(lambda: run.status().jobs[0].state is JobState.RUNNING, 60, "the job to run")
        busy = run_cli(*args, "--stop")
        assert busy.returncode == 0, busy.stderr
        assert "(warm: its running job finished first)" in busy.stdout, busy.stdout
        assert run.status().jobs[0].state is JobState.SUCCEEDED
    finally:
        run_cli(*args, "--stop", "--now")


@pytest.mark.alone
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_suite_stops_every_server_and_worker_it_started(
        signum: signal.Signals, tmp_path: Path) -> None:
    pids_file = tmp_path / "pids.json"
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--basetemp",
         str(tmp_path / "inner"), str(REPO / "tests" / "interrupted_suite.py")],
        cwd=REPO, env={**os.environ, "SC_TEST_PIDS": str(pids_file)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=default_sigint)
    try:
        wait_for(lambda: pids_file.exists() or inner.poll() is not None, 120,
                 "the inner suite to start its Redis and workers")
        assert inner.poll() is None, inner.communicate()[0]
        pids = json.loads(pids_file.read_text())
        inner.send_signal(signum)
        output = inner.communicate(timeout=90)[0]
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait(timeout=30)
    assert "KeyboardInterrupt" in output or "Interrupted" in output, output

    def left() -> list[int]:
        alive = [pid for sid in pids["workers"] for pid in session_members(sid)]
        return alive + ([pids["redis"]] if is_redis(pids["redis"]) else [])

    wait_for(lambda: not left(), 30, "every worker and the Redis to be gone",
             seen=lambda: str(left()))


def is_redis(pid: int) -> bool:
    """Process ``pid`` is a live redis-server (its name, not a reused pid's)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return comm.startswith("redis-server") and state != "Z"
