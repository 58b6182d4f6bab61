"""README promises that had no test, each asserted on its observable effect.

Every test here was checked by breaking the promise on purpose in a scratch copy
and watching it go red (the README's testing section lists which break each
catches).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from coordinator import BrokerUnreachableError, JobState, RunStatus, get_run, submit
from coordinator.collector import collect
from coordinator.local import LocalCluster
from coordinator.mergers.scoring import ScoringMerger
from coordinator.records import JobRecord
from coordinator.redis_server import RedisServer
from tests.helpers import BIN, REPO, echo_job, run_cli, write_jobs
from tests.waiting import alive, wait_for


def probe_job(job_id: str, node: str, ledger: Path, *extra: str, **fields: object) -> dict:
    return {"job_id": job_id, "script": "tests/probe_job.py", "node": node,
            "args": ["--ledger", str(ledger), "--output-file", f"p/{job_id}.json", *extra],
            **fields}


def test_a_timeout_kills_the_script_and_its_children(cluster: LocalCluster,
                                                     tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    run = submit([probe_job("late", "rig-d", ledger, "--sleep", "60", "--child-sleep", "60",
                            timeout=1.5)], output_dir="p", broker_url=cluster.broker_url)
    job = run.wait(timeout=60).jobs[0]
    assert job.state is JobState.FAILED
    assert job.error.startswith("timed out after 1.5 s; killed")
    script = int((ledger / "late.ledger").read_text().split()[2])
    child = int((ledger / "late.children").read_text())
    wait_for(lambda: not alive(script) and not alive(child), 10, "both to be killed")


def test_the_collector_settles_by_the_done_file_whatever_the_record_says(
        cluster: LocalCluster, cluster_workdir: Path) -> None:
    run = submit([echo_job("said_ok", "rig-a", "settle"), echo_job("said_bad", "rig-b",
                                                                   "settle", "--exit-code", "4")],
                 output_dir="settle", broker_url=cluster.broker_url)
    status = run.wait(timeout=60)
    out = cluster_workdir / "settle"
    (out / "said_ok.json.done").unlink()  # the record says succeeded, the file says no
    (out / "said_bad.json.done").write_text("{}")  # the record says failed, the file says yes
    collection = collect(status, workdir=cluster_workdir)
    summary = collection.summary
    states = {job["job_id"]: (job["state"], job["error"]) for job in summary["jobs"]}
    # Not succeeded by the .done rule, but not failed either: its worker said it succeeded.
    assert states["said_ok"][0] == "unconfirmed"
    assert f"but {out / 'said_ok.json.done'} does not exist on this machine" in \
        states["said_ok"][1]
    assert states["said_bad"][0] == "succeeded"
    assert summary["succeeded"] == 1 and not summary["all_succeeded"]
    assert collection.exit_code == 7


def test_output_file_equals_form_is_rewritten_with_its_marker_beside_it(
        cluster: LocalCluster, cluster_workdir: Path) -> None:
    # The output is not named after the job: a marker made without the output file
    # (<output-dir>/<job_id>.json.done) would not be the one beside it.
    job = {"job_id": "eq", "script": "examples/write_output.py",
           "args": ["--output-file=deep/nested/eq_result.json"], "node": "rig-c"}
    run = submit([job], output_dir="eqout", broker_url=cluster.broker_url)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    assert (cluster_workdir / "eqout" / "eq_result.json").is_file()
    assert (cluster_workdir / "eqout" / "eq_result.json.done").is_file()
    assert not (cluster_workdir / "deep").exists()


def record(job_id: str, state: JobState = JobState.SUCCEEDED) -> JobRecord:
    return JobRecord(job_id=job_id, node="rig-a", state=state, script="full_scoring_worker.py",
                     output_file=f"o/{job_id}.json", done_file=f"o/{job_id}.json.done")


def test_the_merged_ranking_breaks_score_ties_by_seed(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    chunks = {"c1": [(30, 5), (10, 5), (99, 9)], "c2": [(20, 5), (-4, 5), (7, 1)]}
    for job_id, scored in chunks.items():
        (tmp_path / "o" / f"{job_id}.json").write_text(json.dumps({
            "prng_type": "java_lcg", "mod": 1000, "skip": 0, "n_draws": 10,
            "results": [{"seed": seed, "matches": m, "score": m / 10} for seed, m in scored]}))
    result = ScoringMerger().merge([record("c1"), record("c2")], Path("o"), tmp_path)
    merged = json.loads(result.path.read_text())
    assert [r["seed"] for r in merged["results"]] == [99, -4, 10, 20, 30, 7]
    assert {key: value for key, value in merged.items() if key != "results"} == {
        "format_version": 1, "prng_type": "java_lcg", "mod": 1000, "skip": 0, "n_draws": 10,
        "mixed_parameters": False, "chunks": 2, "n_seeds": 6}
    assert result.path == tmp_path / "o" / "survivors_with_scores.json"
    assert result.lines[:4] == ["merged 6 seeds from 2 chunks into o/survivors_with_scores.json",
                                "top 6 by score:",
                                "  rank                  seed  matches     score",
                                "     1                    99        9    0.9000"]
    assert (result.kind, result.details["n_seeds"], len(result.details["top"])) == (
        "scoring", 6, 6)
    assert ScoringMerger().claims(record("c1")) and not ScoringMerger().claims(
        JobRecord(job_id="x", node="n", state=JobState.SUCCEEDED, script="other.py"))
    # A chunk scored with other parameters is flagged, and the first chunk's are kept.
    (tmp_path / "o" / "c3.json").write_text(json.dumps({
        "prng_type": "java_lcg", "mod": 100, "skip": 0, "n_draws": 10, "results": []}))
    mixed = ScoringMerger().merge([record("c1"), record("c3")], Path("o"), tmp_path)
    document = json.loads(mixed.path.read_text())
    assert (document["mixed_parameters"], document["mod"], document["chunks"]) == (True, 1000, 2)
    # Eleven rows: the top ten are printed.
    (tmp_path / "o" / "c4.json").write_text(json.dumps({
        "prng_type": "java_lcg", "mod": 1000, "skip": 0, "n_draws": 10,
        "results": [{"seed": seed, "matches": 1, "score": 0.1} for seed in range(11)]}))
    many = ScoringMerger().merge([record("c4")], Path("o"), tmp_path)
    assert many.lines[1] == "top 10 by score:" and len(many.lines) == 13
    assert len(many.details["top"]) == 10
    # A job without an output file (first) is passed over, a chunk without results adds none.
    (tmp_path / "o" / "c5.json").write_text(json.dumps({
        "prng_type": "java_lcg", "mod": 1000, "skip": 0, "n_draws": 10}))
    bare = JobRecord(job_id="bare", node="rig-a", state=JobState.SUCCEEDED,
                     script="full_scoring_worker.py")
    last = ScoringMerger().merge([bare, record("c5"), record("c1")], Path("o"), tmp_path)
    assert json.loads(last.path.read_text())["n_seeds"] == 3
    assert last.details["file"] == "o/survivors_with_scores.json"
    nothing = json.loads(ScoringMerger().merge([bare], Path("o"), tmp_path).path.read_text())
    assert (nothing["n_seeds"], nothing["chunks"], nothing["results"]) == (0, 1, [])


def test_exit_6_when_the_local_cluster_cannot_start(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.json", [echo_job("never", "rig-a")])
    # A redis-server that cannot start (a broken install): the first one on PATH.
    broken = tmp_path / "bin" / "redis-server"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho 'Fatal: cannot open the data directory' >&2\nexit 1\n")
    broken.chmod(0o755)
    temp = tmp_path / "temp"
    temp.mkdir()
    result = run_cli("local", "--jobs-file", str(jobs), "--scripts-dir", str(REPO),
                     cwd=tmp_path, env={"PATH": f"{broken.parent}:{os.environ['PATH']}",
                                        "TMPDIR": str(temp)})
    assert result.returncode == 6, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "coordinator: error: redis-server exited with status 1: Fatal: cannot open the data "
        "directory")
    assert not (tmp_path / "full_scoring_results").exists()
    assert list(temp.iterdir()) == []  # no Redis directory (nor key) left behind


@pytest.mark.parametrize("tool", ["scripts-coordinator", "submit"])
def test_exit_5_when_the_timeout_passes(tool: str, cluster: LocalCluster,
                                        tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.json", [echo_job(f"wait_{tool}", "rig-unserved", "w")])
    argv = ["--jobs-file", str(jobs), "--timeout", "1", "--broker", cluster.broker_url]
    if tool == "submit":
        result = run_cli("submit", "--wait", *argv)
    else:
        result = run_cli(*argv, tool="scripts-coordinator")
    assert result.returncode == 5
    assert "not finished after 1 s (0/1 final: 1 queued)" in result.stderr


def test_the_python_api_cancels_retries_reports_progress(cluster: LocalCluster,
                                                        cluster_workdir: Path) -> None:
    flag = cluster_workdir / "api-flag"
    run = submit([echo_job("api_slow", "rig-a", "api", "--sleep", "30"),
                  echo_job("api_fix", "rig-b", "api", "--fail-unless-exists", str(flag))],
                 output_dir="api", broker_url=cluster.broker_url)
    seen: list[RunStatus] = []
    wait_for(lambda: [job.state for job in run.status().jobs] == [JobState.RUNNING,
                                                                  JobState.FAILED],
             60, "api_slow to run and api_fix to fail")
    assert run.cancel() == 1  # the running one (a failed job is final already)
    status = run.wait(timeout=60, on_progress=seen.append)  # a 30 s job: ended by the kill
    assert seen and seen[-1].finished and isinstance(seen[0], RunStatus)
    assert [job.state for job in status.jobs] == [JobState.CANCELLED, JobState.FAILED]
    flag.write_text("")  # the cause is fixed: retry runs both again (cancelled ones too)
    assert run.retry_failed() == 2
    progress: list[str] = []
    final = get_run(run.id, cluster.broker_url).wait(
        timeout=90, on_progress=lambda s: progress.append(s.line()))
    assert {job.job_id: job.state for job in final.jobs} == {
        "api_slow": JobState.SUCCEEDED, "api_fix": JobState.SUCCEEDED}
    assert progress[-1] == "2/2 final: 2 succeeded"
    with pytest.raises(BrokerUnreachableError, match="cannot reach Redis at "
                                                     r"redis://127\.0\.0\.1:1/0"):
        submit([echo_job("x", "rig-a")], broker_url="redis://127.0.0.1:1/0")


def test_a_second_worker_is_refused_unless_forced(cluster: LocalCluster,
                                                  tmp_path: Path) -> None:
    args = ["worker", "--node", "rig-a", "--workdir", str(tmp_path), "--broker",
            cluster.broker_url]
    refused = run_cli(*args, "--detach")
    assert refused.returncode == 2 and "already served by rig-a@" in refused.stderr
    forced = run_cli(*args, "--detach", "--force")
    try:
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout.startswith("started worker rig-a@")
    finally:
        stopped = run_cli(*args, "--stop", "--now")
        assert stopped.returncode == 0 and "killed worker pid" in stopped.stdout


def test_broker_before_the_command_and_a_masked_password(cluster: LocalCluster) -> None:
    run = submit([echo_job("before", "rig-a", "b")], output_dir="b",
                 broker_url=cluster.broker_url)
    run.wait(timeout=60)
    result = run_cli("--broker", cluster.broker_url, "status", run.id, "--no-check")
    assert result.returncode == 0 and f"run {run.id} (finished)" in result.stdout
    secret = run_cli("status", "--broker", "redis://:hunter2@127.0.0.1:1/0")
    assert secret.returncode == 3
    assert "redis://:***@127.0.0.1:1/0" in secret.stderr and "hunter2" not in secret.stderr


def test_scripts_coordinator_dry_run_prints_the_plan_and_publishes_nothing(
        redis_server: RedisServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.json", [
        {"job_id": "d1", "script": "examples/write_output.py",
         "args": ["--output-file", "elsewhere/d1.json"], "node": "rig-dry"}])
    client = redis.Redis.from_url(redis_server.url)
    runs_before = client.zcard("sc:runs")
    result = run_cli("--jobs-file", str(jobs), "--dry-run", "--broker", redis_server.url,
                     tool="scripts-coordinator")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "plan: 1 jobs on 1 nodes; output dir full_scoring_results; paths rewritten",
        "node rig-dry (queue node.rig-dry): 1 jobs, run one at a time",
        "  d1  gpu 0  examples/write_output.py --output-file full_scoring_results/d1.json",
        "      output full_scoring_results/d1.json  done full_scoring_results/d1.json.done",
        "dry run: nothing published"]
    assert client.zcard("sc:runs") == runs_before and client.llen("node.rig-dry") == 0


def test_connect_timeout_run_ttl_and_key_prefix_are_honoured(tmp_path: Path) -> None:
    # SC_CONNECT_TIMEOUT: a Redis that accepts connections and never answers.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        started = time.monotonic()
        result = run_cli("status", "--broker", f"redis://127.0.0.1:{port}/0",
                         env={"SC_CONNECT_TIMEOUT": "0.5"})
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert result.returncode == 3 and "cannot reach Redis" in result.stderr
    assert elapsed < 8  # 0.5 s to connect, 1.5 s to answer (the default would be 3 s + 9 s)
    # SC_RUN_TTL and SC_KEY_PREFIX, on both sides (submitter and workers).
    env = {"SC_RUN_TTL": "120", "SC_KEY_PREFIX": "alt"}
    with RedisServer() as server, LocalCluster(["rig-k"], workdir=tmp_path,
                                               log_dir=tmp_path / "logs", broker_url=server.url,
                                               extra_env=env):
        jobs = write_jobs(tmp_path / "jobs.json", [echo_job("k", "rig-k", "k")])
        result = run_cli("submit", "--jobs-file", str(jobs), "--wait", "--timeout", "60",
                         "--broker", server.url, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        client = redis.Redis.from_url(server.url)
        run_id = client.zrange("alt:runs", 0, 0)[0].decode()
        assert 0 < client.ttl(f"alt:run:{run_id}:job:k") <= 120
        assert client.ttl(f"alt:run:{run_id}") <= 120
        assert client.keys("sc:run:*") == []
        default = run_cli("status", run_id, "--broker", server.url)
        assert default.returncode == 4  # another prefix sees no such run


def test_legacy_skip_automatic_ids_and_a_history_path(cluster: LocalCluster,
                                                      cluster_workdir: Path) -> None:
    from scoring.prng import reference_draws

    secret = 424242
    history = reference_draws("java_lcg", secret, 1000, 30, skip=3)
    (cluster_workdir / "legacy_history.json").write_text(json.dumps(history))
    legacy = [{"seeds": [secret, 5, 6], "prng_type": "java_lcg", "mod": 1000, "skip": 3,
               "train_history": "legacy_history.json", "node": "rig-a"},
              {"seeds": [7, secret], "prng_type": "java_lcg", "mod": 1000,
               "train_history": "legacy_history.json", "node": "rig-b"}]
    run = submit(legacy, output_dir="leg", broker_url=cluster.broker_url,
                 chunk_dir="leg_chunks", workdir=cluster_workdir)
    status = run.wait(timeout=120)
    assert [job.job_id for job in status.jobs] == ["legacy_0000", "legacy_0001"]
    assert status.all_succeeded
    first = json.loads((cluster_workdir / "leg" / "legacy_0000.json").read_text())
    second = json.loads((cluster_workdir / "leg" / "legacy_0001.json").read_text())
    assert first["skip"] == 3 and second["skip"] == 0
    assert first["results"][0] == {"seed": secret, "matches": 30, "score": 1.0}
    assert max(r["matches"] for r in second["results"]) < 30  # without the skip: no match


def test_readme_command_1_demo_script(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run([str(REPO / "examples" / "step3_demo.sh"), str(tmp_path / "d"),
                             "--candidates", "20000", "--nodes", "2"], env=env, text=True,
                            capture_output=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    assert "36/36 succeeded" in result.stdout
    secret = json.loads((tmp_path / "d" / "secret.json").read_text())["secret_seed"]
    assert f"secret seed {secret} found at rank 1 (100 matches)" in result.stdout


def test_wait_progress_comes_from_another_thread_too(cluster: LocalCluster) -> None:
    """The handle is usable from a thread (other pipeline steps do that)."""
    run = submit([echo_job("threaded", "rig-c", "t")], output_dir="t",
                 broker_url=cluster.broker_url)
    results: list[RunStatus] = []
    thread = threading.Thread(target=lambda: results.append(run.wait(timeout=60)))
    thread.start()
    thread.join(timeout=90)
    assert results and results[0].jobs[0].state is JobState.SUCCEEDED
