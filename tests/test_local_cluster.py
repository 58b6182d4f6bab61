"""End to end on a real Redis and four real Celery workers (one per node)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections import defaultdict
from pathlib import Path

import redis

from coordinator import JobState, get_run, submit
from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer, free_port
from tests.helpers import NODES, REPO, echo_job, queue_lengths, run_cli, write_jobs
from tests.waiting import alive, wait_for


def scripts_writing(out: Path) -> list[int]:
    """Pids of the job scripts whose command line writes into ``out``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.startswith(f"{out.name}/".encode()) for arg in cmdline) and \
                any(arg.endswith(b"write_output.py") for arg in cmdline):
            found.append(int(entry.name))
    return found


def wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}")


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_36_seed_format_jobs_over_4_nodes(cluster: LocalCluster, cluster_workdir: Path,
                                          tmp_path: Path) -> None:
    """The original tool's case: 36/36 done, one at a time per node, nodes in parallel."""
    record = tmp_path / "times.jsonl"
    jobs = [
        {"job_id": f"chunk_{i:04d}", "script": "examples/write_output.py",
         "args": ["--seeds-file", f"scoring_chunks/chunk_{i:04d}.json",
                  "--output-file", f"full_scoring_results/chunk_{i:04d}.json",
                  "--sleep", 0.2, "--record", str(record)],
         "node": NODES[i % 4], "gpu_id": i % 2}
        for i in range(36)
    ]
    jobs_file = write_jobs(tmp_path / "jobs.json", jobs)
    result = run_cli("--jobs-file", str(jobs_file), "--output-dir", "t36",
                     "--broker", cluster.broker_url, tool="scripts-coordinator",
                     cwd=cluster_workdir)
    assert result.returncode == 0, result.stderr
    out = cluster_workdir / "t36"
    assert len(list(out.glob("chunk_*.json.done"))) == 36
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["succeeded"] == 36 and summary["success_rate"] == 1.0
    assert summary["counts"]["failed"] == 0
    assert {name: node["jobs"] for name, node in summary["nodes"].items()} == {
        node: 9 for node in NODES}
    by_id = {job["job_id"]: job for job in summary["jobs"]}
    assert by_id["chunk_0005"]["node"] == "rig-b" and by_id["chunk_0005"]["gpu_id"] == 1
    assert by_id["chunk_0005"]["log"] == "t36/logs/chunk_0005.log"
    assert "36/36 succeeded" in result.stdout
    # Without a terminal, progress is one line per change seen (polled), on stderr.
    assert re.search(r"\[rig-b\] chunk_0005 succeeded in \d+\.\d s", result.stderr)
    assert "(36/36)" in result.stderr

    times = read_records(record)
    assert len(times) == 36
    per_node: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for entry in times:
        per_node[entry["node"]].append((entry["start"], entry["end"]))
    for node, spans in per_node.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"two jobs of {node} overlapped"
    a, b = per_node["rig-a"], per_node["rig-b"]
    overlapping = sum(1 for s1, e1 in a for s2, e2 in b if s1 < e2 and s2 < e1)
    assert overlapping > 0, "nodes did not run in parallel"
    # Each job saw its own GPU.
    output = json.loads((out / "chunk_0005.json").read_text())
    assert output["gpu"] == "1"


def test_failures_are_recorded_and_do_not_stop_others(cluster: LocalCluster,
                                                      cluster_workdir: Path) -> None:
    jobs = [
        echo_job("ok_1", "rig-a"),
        echo_job("exit_3", "rig-a", "x", "--exit-code", "3"),
        echo_job("no_output", "rig-b", "x", "--no-output"),
        echo_job("bad_json", "rig-b", "x", "--invalid-json"),
        {"job_id": "missing_script", "script": "no/such_script.py", "args": [], "node": "rig-c"},
        echo_job("ok_after_missing", "rig-c"),
    ]
    run = submit(jobs, output_dir="fail", broker_url=cluster.broker_url)
    status = run.wait(timeout=120)
    states = {job.job_id: job.state for job in status.jobs}
    assert states == {"ok_1": JobState.SUCCEEDED, "exit_3": JobState.FAILED,
                      "no_output": JobState.FAILED, "bad_json": JobState.FAILED,
                      "missing_script": JobState.FAILED,
                      "ok_after_missing": JobState.SUCCEEDED}
    out = cluster_workdir / "fail"
    assert sorted(p.name for p in out.glob("*.done")) == ["ok_1.json.done",
                                                           "ok_after_missing.json.done"]
    errors = {job.job_id: job.error for job in status.jobs}
    # The error carries the end of the script's own output (here its one line).
    assert errors["exit_3"].splitlines() == [
        "script exited with status 3", "last lines of its output:",
        f"job on {socket.gethostname()} with CUDA_VISIBLE_DEVICES=0"]
    assert "was not written" in errors["no_output"]
    assert "not valid JSON" in errors["bad_json"]
    assert "not found in scripts directory" in errors["missing_script"]
    log = (out / "logs" / "missing_script.log").read_text()
    assert "[scripts-coordinator] FAILED: script 'no/such_script.py' not found" in log

    collected = run_cli("collect", run.id, "--broker", cluster.broker_url, cwd=cluster_workdir)
    assert collected.returncode == 1
    assert "FAILED exit_3 on rig-a: script exited with status 3 (log fail/logs/exit_3.log)" \
        in collected.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    failed = {job["job_id"]: job for job in summary["jobs"] if job["state"] == "failed"}
    assert set(failed) == {"exit_3", "no_output", "bad_json", "missing_script"}
    assert failed["exit_3"]["exit_code"] == 3
    assert failed["exit_3"]["log"] == "fail/logs/exit_3.log"
    assert summary["success_rate"] == round(2 / 6, 4)


def test_worker_side_errors_fail_the_job_instead_of_leaving_it_running(
    cluster: LocalCluster, cluster_workdir: Path
) -> None:
    (cluster_workdir / "blocker").write_text("a file where the output directory should be")
    run = submit([echo_job("blocked", "rig-b")], output_dir="blocker",
                 broker_url=cluster.broker_url)
    job = run.wait(timeout=60).jobs[0]
    assert job.state is JobState.FAILED
    assert job.error.startswith("worker error: ")
    assert cluster.workers["rig-b"].poll() is None  # the worker lives on


def test_done_marker_means_skip(cluster: LocalCluster, cluster_workdir: Path,
                                tmp_path: Path) -> None:
    record = tmp_path / "ran.jsonl"
    out = cluster_workdir / "resume"
    out.mkdir()
    (out / "first.json").write_text("{}")
    (out / "first.json.done").write_text("{}")
    jobs = [echo_job(name, "rig-d", "elsewhere", "--record", str(record))
            for name in ("first", "second")]
    run = submit(jobs, output_dir="resume", broker_url=cluster.broker_url)
    status = run.wait(timeout=60)
    assert {job.job_id: job.state for job in status.jobs} == {
        "first": JobState.SKIPPED, "second": JobState.SUCCEEDED}
    assert [entry["job"] for entry in read_records(record)] == ["second"]
    summary = run.summary(workdir=str(cluster_workdir))
    assert summary["all_succeeded"] and summary["counts"]["skipped"] == 1


def test_status_wait_collect_work_from_other_processes(cluster: LocalCluster,
                                                       cluster_workdir: Path,
                                                       tmp_path: Path) -> None:
    jobs_file = write_jobs(tmp_path / "jobs.json",
                           [echo_job(f"j{i}", NODES[i % 2], "o", "--sleep", "0.3")
                            for i in range(4)])
    submitted = run_cli("submit", "--jobs-file", str(jobs_file), "--output-dir", "cli",
                        "--broker", cluster.broker_url, "--json", cwd=cluster_workdir)
    assert submitted.returncode == 0, submitted.stderr
    run_id = json.loads(submitted.stdout)["run_id"]
    waited = run_cli("wait", run_id, "--timeout", "60", "--broker", cluster.broker_url,
                     cwd=cluster_workdir)
    assert waited.returncode == 0, waited.stderr
    assert "4/4 succeeded" in waited.stdout
    status = run_cli("status", run_id, "--json", "--broker", cluster.broker_url)
    document = json.loads(status.stdout)
    assert document["finished"] is True
    assert {job["state"] for job in document["jobs"]} == {"succeeded"}
    assert all(job["attempts"] == 1 and job["exit_code"] == 0 for job in document["jobs"])
    assert all(job["host"].startswith(job["node"] + "@") for job in document["jobs"])
    # The newest run is the default.
    plain = run_cli("status", "--broker", cluster.broker_url)
    assert plain.returncode == 0 and run_id in plain.stdout


def test_preserve_paths_writes_where_the_args_say(cluster: LocalCluster,
                                                  cluster_workdir: Path) -> None:
    """Step 5 style (examples/step5_jobs.json): nested outputs kept where the args put them."""
    example = REPO / "examples" / "step5_jobs.json"
    result = run_cli("--jobs-file", str(example), "--preserve-paths", "--output-dir", "s5",
                     "--broker", cluster.broker_url, tool="scripts-coordinator",
                     cwd=cluster_workdir)
    assert result.returncode == 0, result.stderr
    for path in ("step5/trial_a/fold_0.json", "step5/trial_a/fold_1.json",
                 "step5/trial_b/fold_2.json"):
        assert (cluster_workdir / path).exists() and (cluster_workdir / f"{path}.done").exists()
    assert not list((cluster_workdir / "s5").glob("*.json.done"))  # nothing rewritten
    assert (cluster_workdir / "s5" / "run_summary.json").exists()
    assert (cluster_workdir / "s5" / "logs" / "fold_2.log").exists()


def test_dry_run_prints_plan_and_publishes_nothing(cluster: LocalCluster, tmp_path: Path,
                                                   client: redis.Redis) -> None:
    jobs_file = write_jobs(tmp_path / "jobs.json",
                           [echo_job("dry_a", "rig-a", "deep/path"),
                            echo_job("dry_b", "rig-b", "deep/path")])
    runs_before = client.zcard("sc:runs")
    result = run_cli("submit", "--jobs-file", str(jobs_file), "--output-dir", "plan",
                     "--dry-run", "--broker", cluster.broker_url)
    assert result.returncode == 0, result.stderr
    assert "node rig-a (queue node.rig-a): 1 jobs" in result.stdout
    assert "--output-file plan/dry_a.json" in result.stdout
    assert "done plan/dry_b.json.done" in result.stdout
    preserved = run_cli("submit", "--jobs-file", str(jobs_file), "--dry-run", "--preserve-paths")
    assert "--output-file deep/path/dry_a.json" in preserved.stdout
    assert client.zcard("sc:runs") == runs_before
    assert queue_lengths(client) == dict.fromkeys(NODES, 0)


def test_invalid_input_exits_2_and_publishes_nothing(cluster: LocalCluster, tmp_path: Path,
                                                     client: redis.Redis) -> None:
    runs_before = client.zcard("sc:runs")
    good = echo_job("good", "rig-a")
    cases = {
        "missing.json": None,
        "broken.json": '[{"job_id": "x",',
        "notlist.json": '{"jobs": []}',
        "dupe.json": json.dumps([good, good]),
        "escape.json": json.dumps([good, dict(good, job_id="evil", script="../evil.py")]),
        "abs.json": json.dumps([dict(good, script="/bin/sh")]),
        "gpu.json": json.dumps([dict(good, gpu_id=-2)]),
        "types.json": json.dumps([dict(good, args="--x 1")]),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        for tool in ("coordinator", "scripts-coordinator"):
            argv = ["--jobs-file", str(path), "--broker", cluster.broker_url]
            result = run_cli(*(["submit", *argv] if tool == "coordinator" else argv), tool=tool)
            assert result.returncode == 2, (name, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), lines
            assert str(path) in lines[0]
    assert client.zcard("sc:runs") == runs_before
    assert queue_lengths(client) == dict.fromkeys(NODES, 0)


def test_unreachable_broker_exits_3_quickly(tmp_path: Path) -> None:
    jobs_file = write_jobs(tmp_path / "jobs.json", [echo_job("a", "rig-a")])
    started = time.monotonic()
    result = run_cli("submit", "--jobs-file", str(jobs_file),
                     "--broker", f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 3
    assert time.monotonic() - started < 15
    assert result.stderr.startswith("coordinator: error: cannot reach Redis at redis://127.0.0.1")
    assert len(result.stderr.strip().splitlines()) == 1
    status = run_cli("status", "x", "--broker", f"redis://127.0.0.1:{free_port()}/0")
    assert status.returncode == 3


def test_broker_down_with_tracking_up_records_nothing(
    redis_server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    jobs_file = write_jobs(tmp_path / "jobs.json", [echo_job("a", "rig-a")])
    runs_before = client.zcard("sc:runs")
    result = run_cli("submit", "--jobs-file", str(jobs_file),
                     "--broker", f"redis://127.0.0.1:{free_port()}/0",
                     env={"SC_TRACKING_URL": redis_server.url})
    assert result.returncode == 3
    assert "cannot reach the broker at redis://127.0.0.1" in result.stderr
    assert client.zcard("sc:runs") == runs_before


def test_wait_timeout_exits_5_and_cancel_ends_the_run(cluster: LocalCluster,
                                                      tmp_path: Path) -> None:
    # No worker serves rig-z: the job stays queued, and submit says so.
    jobs_file = write_jobs(tmp_path / "jobs.json", [echo_job("orphan", "rig-z"),
                                                    echo_job("served", "rig-a")])
    submitted = run_cli("submit", "--jobs-file", str(jobs_file), "--output-dir", "orphan",
                        "--broker", cluster.broker_url)
    assert submitted.returncode == 0, submitted.stderr
    assert ("coordinator: warning: no worker serves node rig-z (queue node.rig-z); its 1 jobs "
            "wait until one starts") in submitted.stderr
    assert "rig-a" not in submitted.stderr.split("warning", 1)[1]
    run = get_run(submitted.stdout.strip(), cluster.broker_url)
    started = time.monotonic()
    result = run_cli("wait", run.id, "--timeout", "1.5", "--broker", cluster.broker_url,
                     cwd=cluster.workdir)
    assert result.returncode == 5
    assert time.monotonic() - started < 30
    assert f"run {run.id}: not finished after 1.5 s (" in result.stderr
    # The orphan is queued (the served job may be done or not yet): exactly one queued.
    assert re.search(r"[(, ]1 queued\b", result.stderr), result.stderr
    status = run_cli("status", run.id, "--broker", cluster.broker_url)
    assert "node rig-z (no worker running):" in status.stdout
    assert "node rig-a (rig-a@" in status.stdout
    listed = run_cli("runs", "--limit", "3", "--broker", cluster.broker_url)
    assert listed.returncode == 0 and listed.stdout.startswith(run.id)
    assert run_cli("cancel", run.id, "--broker", cluster.broker_url).returncode == 0
    assert {job.job_id: job.state for job in run.wait(timeout=5).jobs} == {
        "orphan": JobState.CANCELLED, "served": JobState.SUCCEEDED}


def test_a_second_worker_for_a_node_is_refused(cluster: LocalCluster) -> None:
    result = run_cli("worker", "--node", "rig-a", "--broker", cluster.broker_url)
    assert result.returncode == 2
    assert "node rig-a is already served by rig-a@" in result.stderr
    assert "--force starts it anyway" in result.stderr
    bad = run_cli("worker", "--node", "rig a", "--broker", cluster.broker_url)
    assert bad.returncode == 2 and "--node 'rig a'" in bad.stderr


def test_unknown_run_exits_4(cluster: LocalCluster) -> None:
    result = run_cli("status", "20990101-000000-000000", "--broker", cluster.broker_url)
    assert result.returncode == 4
    assert "not found" in result.stderr


def test_retry_runs_failed_jobs_again(cluster: LocalCluster, cluster_workdir: Path) -> None:
    flag = cluster_workdir / "retry-flag"
    job = echo_job("flaky", "rig-a", "r", "--fail-unless-exists", str(flag))
    run = submit([job, echo_job("steady", "rig-b")], output_dir="retry",
                 broker_url=cluster.broker_url)
    first = {job.job_id: job for job in run.wait(timeout=60).jobs}
    assert first["flaky"].state is JobState.FAILED and first["flaky"].exit_code == 1
    flag.write_text("")  # the cause is fixed
    retried = run_cli("retry", run.id, "--wait", "--timeout", "60", "--broker",
                      cluster.broker_url, cwd=cluster_workdir)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "published 1 failed, cancelled or lost jobs again" in retried.stdout
    after = {job.job_id: job for job in get_run(run.id, cluster.broker_url).status().jobs}
    assert after["flaky"].state is JobState.SUCCEEDED and after["flaky"].attempts == 2
    assert after["steady"].attempts == 1  # succeeded jobs are not run again
    assert (cluster_workdir / "retry" / "flaky.json.done").exists()


def test_cancel_stops_the_running_job_and_drops_the_queued_ones(cluster: LocalCluster,
                                                                 cluster_workdir: Path) -> None:
    jobs = [echo_job(f"slow_{i}", "rig-c", "c", "--sleep", "30") for i in range(4)]
    run = submit(jobs, output_dir="cancel", broker_url=cluster.broker_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the first job runs
        if any(job.state is JobState.RUNNING for job in run.status().jobs):
            break
        time.sleep(0.1)
    wait_for(lambda: scripts_writing(cluster_workdir / "cancel"), 30, "the running job's script")
    running = scripts_writing(cluster_workdir / "cancel")
    result = run_cli("cancel", run.id, "--broker", cluster.broker_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"run {run.id}: cancelled 4 queued or running jobs\n"
    # The script sleeps 30 s: only a kill ends it within this deadline.
    wait_for(lambda: not any(alive(pid) for pid in running), 10,
             "the cancelled job's script to be killed")
    status = run.wait(timeout=30)
    assert [job.state for job in status.jobs] == [JobState.CANCELLED] * 4
    # Each dropped message is taken by the worker and refused, never run: wait for all four.
    log = cluster_workdir / "worker-logs" / "worker-rig-c.log"
    for job in status.jobs:
        wait_for_text(log, f"job {job.job_id} of run {run.id}", 30)
    assert not list((cluster_workdir / "cancel").glob("*.done"))
    assert not (cluster_workdir / "cancel" / "slow_1.json").exists()


def test_a_jobs_runner_is_named_after_its_job_in_ps(cluster: LocalCluster,
                                                      redis_server: RedisServer) -> None:
    """An operator reading ``ps`` sees which process runs which job (not a second copy of
    its pool process's title)."""
    run = submit([echo_job("titled", "rig-b", "titled", "--sleep", "60")], output_dir="titled",
                 broker_url=redis_server.url)
    title = f"scripts-coordinator runner: job titled of run {run.id} on rig-b, attempt 1"

    def cmdline(pid: int | str) -> str:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return ""
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()

    def runners() -> list[int]:
        return [int(entry.name) for entry in Path("/proc").iterdir()
                if entry.name.isdigit() and cmdline(entry.name) == title]

    try:
        wait_for(lambda: len(runners()) == 1, 60, "the job's runner, named after its job")
        (runner,) = runners()
        children = Path(f"/proc/{runner}/task/{runner}/children").read_text().split()
        assert [cmdline(child).endswith("titled/titled.json --sleep 60") for child in children] \
            == [True], [cmdline(child) for child in children]  # it runs the script
    finally:
        run.cancel()
    wait_for(lambda: runners() == [], 30, "the runner to end with the cancel")


def test_status_of_an_unsigned_run_where_no_worker_verifies_says_nothing_of_signing(
        cluster: LocalCluster, redis_server: RedisServer) -> None:
    run = submit([echo_job("quiet", "rig-c", "quiet")], output_dir="quiet",
                 broker_url=redis_server.url)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    shown = run_cli("status", run.id, "--no-check", "--broker", redis_server.url)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == "", shown.stderr  # neither "signing off" nor "unsigned"


def test_a_broker_nobody_serves_is_named_and_not_waited_on_for_ever(tmp_path: Path) -> None:
    """A Redis that holds nothing of ours (another program's, say) is named before the first
    publish; --wait gives up with exit 8 once no worker has served the run for the bound."""
    jobs = write_jobs(tmp_path / "jobs.json", [echo_job("lonely", "rig-nobody", "lonely")])
    with RedisServer() as stranger:
        # Bounded here too: were the bound not kept, this would fail, not hang.
        first = run_cli("submit", "--jobs-file", str(jobs), "--wait", "--no-worker-timeout", "2",
                        "--broker", stranger.url, cwd=tmp_path, timeout=60)
        assert first.returncode == 8, first.stdout + first.stderr
        assert ("holds no run and no worker of scripts-coordinator: publishing the first run "
                "there (name another broker with --broker URL or $SC_BROKER_URL)") in first.stderr
        (line,) = [line for line in first.stderr.splitlines() if "no worker has served" in line]
        assert line.endswith("no worker has served its 1 waiting jobs (node.rig-nobody) for "
                             "2 s; the run goes on: start a worker (coordinator worker --node "
                             "NODE, or coordinator cluster up), or check that this is the "
                             "broker you meant (--broker URL / $SC_BROKER_URL)"), line
        # The run is recorded there now: a second submit is not warned about.
        again = run_cli("submit", "--jobs-file", str(jobs), "--broker", stranger.url,
                        cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert "holds no run" not in again.stderr
