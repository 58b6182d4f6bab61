"""Watching the cluster: Flower as documented (auth on), the metrics, the runs' outcomes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import JobState, submit
from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer, free_port
from tests.helpers import BIN, echo_job, run_cli
from tests.waiting import wait_for

AUTH = ("watcher", "s3cret-flower")


def http(url: str, auth: tuple[str, str] | None = AUTH) -> object:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body.startswith((b"{", b"[")) else body.decode()


@pytest.fixture(scope="module")
def flower(redis_server: RedisServer, cluster: LocalCluster) -> Iterator[str]:
    """`coordinator flower` with basic auth on, against the suite's Redis and workers."""
    port = free_port()
    env = {**os.environ, "SC_BROKER_URL": redis_server.url,
           "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"}
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    process = subprocess.Popen([str(BIN / "coordinator"), "flower", "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def workers_seen() -> bool:
        try:
            return bool(http(f"{base}/api/workers?refresh=1"))
        except (OSError, urllib.error.URLError, ValueError):
            return False

    try:
        wait_for(workers_seen, 90, "Flower to see the workers", every=0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_flower_shows_workers_with_their_queues_and_every_job(flower: str,
                                                             redis_server: RedisServer) -> None:
    workers = http(f"{flower}/api/workers?refresh=1")
    queues = {name: [queue["name"] for queue in info.get("active_queues", [])]
              for name, info in workers.items()}  # type: ignore[union-attr]
    rig_a = next(name for name in queues if name.startswith("rig-a@"))
    assert queues[rig_a] == ["node.rig-a", "node.any"]  # its own, then floating jobs
    jobs = [echo_job("fl_ok", "rig-a", "fl"), echo_job("fl_bad", "rig-b", "fl", "--exit-code", "3",
                     "--reason", "ValueError: chunk 7 has no seeds"),
            echo_job("fl_slow", "rig-c", "fl", "--sleep", "30"),
            echo_job("fl_queued", "rig-c", "fl")]
    run = submit(jobs, output_dir="fl", broker_url=redis_server.url)
    # fl_ok and fl_bad end before the cancel, however slowly their workers take them.
    wanted = {"fl_ok": JobState.SUCCEEDED, "fl_bad": JobState.FAILED, "fl_slow": JobState.RUNNING}
    wait_for(lambda: {job.job_id: job.state for job in run.status().jobs
                      if job.job_id in wanted} == wanted, 60,
             "fl_ok and fl_bad to end and the slow job to run")
    # A job no worker has taken yet is known only by its task-sent event (sent in groups,
    # as Celery's task.multi): Flower lists it as sent, under its job's name.
    queued_id = f"{run.id}.fl_queued.0"

    def queued_seen() -> object:
        task = http(f"{flower}/api/tasks").get(queued_id)  # type: ignore[union-attr]
        return task and (task["state"], task["name"])

    wait_for(lambda: queued_seen() == ("PENDING", f"job fl_queued on rig-c (run {run.id})"),
             30, "Flower to list the queued job from its task-sent event")
    run.cancel()
    run.wait(timeout=60)
    expected = {f"{run.id}.fl_ok.0": "SUCCESS", f"{run.id}.fl_bad.0": "FAILURE",
                f"{run.id}.fl_slow.0": "REVOKED", f"{run.id}.fl_queued.0": "REVOKED"}

    def states() -> dict[str, str]:
        tasks = http(f"{flower}/api/tasks")
        return {task_id: tasks[task_id]["state"] for task_id in expected  # type: ignore[index]
                if task_id in tasks}  # type: ignore[operator]

    wait_for(lambda: states() == expected, 60, "Flower to see every job's end",
             seen=lambda: str(states()))
    failed = http(f"{flower}/api/task/info/{run.id}.fl_bad.0")
    assert isinstance(failed, dict)
    # The list says which job each task is; the page reads like the job's own error.
    assert failed["name"] == f"job fl_bad on rig-b (run {run.id})"
    assert isinstance(failed["runtime"], float) and failed["runtime"] > 0  # its Runtime cell
    ok = http(f"{flower}/api/task/info/{run.id}.fl_ok.0")
    assert ok["name"] == f"job fl_ok on rig-a (run {run.id})"  # type: ignore[index]
    assert "script exited with status 3: ValueError: chunk 7 has no seeds" in failed["exception"]
    assert "\\n" not in failed["exception"], failed["exception"]  # one line, no escapes
    assert failed["traceback"].startswith(f"job fl_bad of run {run.id} failed on rig-b@")
    assert failed["traceback"].rstrip().endswith("ValueError: chunk 7 has no seeds")
    assert "celery" not in failed["traceback"], failed["traceback"]  # not the worker's insides
    assert "fl_bad: examples/write_output.py --output-file fl/fl_bad.json" in \
        failed["args"]  # type: ignore[index]


def test_flower_refuses_without_a_password(flower: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        http(f"{flower}/api/workers", auth=None)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError):
        http(f"{flower}/api/workers", auth=("watcher", "wrong"))


def test_flower_on_a_public_address_needs_a_password(redis_server: RedisServer) -> None:
    result = run_cli("flower", "--address", "0.0.0.0", "--broker", redis_server.url,
                     env={"FLOWER_BASIC_AUTH": ""})
    assert result.returncode == 2
    assert result.stderr == ("coordinator: error: --address 0.0.0.0 is reachable from other "
                             "machines: set FLOWER_BASIC_AUTH=user:password in the environment "
                             "(or listen on 127.0.0.1)\n")


def metric(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def test_metrics_show_a_queue_no_worker_consumes_and_busy_time(tmp_path: Path) -> None:
    with RedisServer() as server, LocalCluster(["rig-m"], workdir=tmp_path,
                                               log_dir=tmp_path / "logs",
                                               broker_url=server.url):
        jobs = [echo_job("m1", "rig-m", "m", "--sleep", "0.3")] + [
            echo_job(f"orphan{i}", "rig-orphan", "m") for i in range(3)]
        run = submit(jobs, output_dir="m", broker_url=server.url)
        wait_for(lambda: run.status().counts[JobState.SUCCEEDED] == 1, 60, "m1 to run")
        port = free_port()
        process = subprocess.Popen([str(BIN / "coordinator"), "metrics", "--port", str(port)],
                                   env={**os.environ, "SC_BROKER_URL": server.url},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def scrape() -> str | None:
                try:
                    return str(http(f"http://127.0.0.1:{port}/metrics", auth=None))
                except (OSError, urllib.error.URLError):
                    return None

            wait_for(lambda: scrape() is not None, 30, "the metrics endpoint")
            text = scrape() or ""
        finally:
            process.terminate()
            process.wait(timeout=30)
        assert "# TYPE sc_queue_length gauge" in text
        assert metric(text, "sc_queue_length", node="rig-orphan", queue="node.rig-orphan") == 3
        assert metric(text, "sc_node_workers", node="rig-orphan") == 0
        assert metric(text, "sc_node_workers", node="rig-m") == 1
        assert metric(text, "sc_node_busy_seconds_total", node="rig-m") >= 0.3
        assert metric(text, "sc_run_jobs", run=run.id, state="queued") == 3
        assert metric(text, "sc_run_jobs", run=run.id, state="succeeded") == 1
        assert metric(text, "sc_unassigned_messages") == 0
        textfile = tmp_path / "sc.prom"
        written = run_cli("metrics", "--textfile", str(textfile),
                          env={"SC_BROKER_URL": server.url})
        assert written.returncode == 0 and written.stdout == f"wrote {textfile}\n"
        assert metric(textfile.read_text(), "sc_queue_length", node="rig-orphan",
                      queue="node.rig-orphan") == 3


def test_runs_lists_finished_failed_and_cancelled_runs(cluster: LocalCluster,
                                                      redis_server: RedisServer,
                                                      tmp_path: Path) -> None:
    ok = submit([echo_job("r_ok", "rig-a", "runs")], output_dir="runs",
                broker_url=redis_server.url)
    ok.wait(timeout=60)
    bad = submit([echo_job("r_bad", "rig-b", "runs", "--exit-code", "2")], output_dir="runs",
                 broker_url=redis_server.url)
    bad.wait(timeout=60)
    stopped = submit([echo_job("r_never", "rig-nowhere", "runs")], output_dir="runs",
                     broker_url=redis_server.url)
    stopped.cancel()
    listed = run_cli("runs", "--limit", "3", "--broker", redis_server.url)
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert lines[ok.id].split()[3] == "finished"
    assert lines[bad.id].split()[3] == "failed"
    assert lines[stopped.id].split()[3] == "cancelled"
    assert "1/1 final: 1 succeeded" in lines[ok.id]



def test_flower_shows_why_a_halted_run_revoked_its_jobs(flower: str,
                                                        redis_server: RedisServer) -> None:
    jobs = [echo_job("hf_bad", "rig-d", "hf", "--sleep", "1", "--exit-code", "2"),
            echo_job("hf_slow", "rig-c", "hf", "--sleep", "60")]
    run = submit(jobs, output_dir="hf", broker_url=redis_server.url, halt="now,fail=1")
    run.wait(timeout=90)
    reason = "halted (--halt now,fail=1): 1 of 1 ended jobs failed"
    slow_id = f"{run.id}.hf_slow.0"

    def slow_task() -> object:
        task = http(f"{flower}/api/tasks").get(slow_id)  # type: ignore[union-attr]
        return task and (task["state"], task.get("exception"))

    wait_for(lambda: slow_task() == ("REVOKED", reason), 60,
             "Flower to show the halted job revoked, with the reason",
             seen=lambda: str(slow_task()))


def test_flower_started_after_a_run_shows_its_jobs_as_they_ended(
        redis_server: RedisServer, cluster: LocalCluster, tmp_path: Path) -> None:
    jobs = [echo_job("late_ok", "rig-a", "late"),
            echo_job("late_bad", "rig-b", "late", "--exit-code", "4")]
    run = submit(jobs, output_dir="late", broker_url=redis_server.url)
    run.wait(timeout=60)
    port = free_port()
    env = {**os.environ, "SC_BROKER_URL": redis_server.url,
           "FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"}
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    log = tmp_path / "flower.log"  # a file, not a pipe: Flower must never block on it
    with log.open("w") as out:
        process = subprocess.Popen([str(BIN / "coordinator"), "flower", "--port", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    expected = {f"{run.id}.late_ok.0": "SUCCESS", f"{run.id}.late_bad.0": "FAILURE"}

    def states() -> dict[str, str]:
        try:
            tasks = http(f"http://127.0.0.1:{port}/api/tasks")
        except (OSError, urllib.error.URLError, ValueError):
            return {}
        return {task_id: tasks[task_id]["state"] for task_id in expected  # type: ignore[index]
                if task_id in tasks}  # type: ignore[operator]

    try:
        wait_for(lambda: states() == expected, 90, "the new Flower to show the earlier run",
                 seen=lambda: f"{states()}; its log ends: {log.read_text()[-2000:]}")
        bad = http(f"http://127.0.0.1:{port}/api/task/info/{run.id}.late_bad.0")
        assert "script exited with status 4" in bad["exception"]  # type: ignore[index]
        assert bad["name"] == f"job late_bad on rig-b (run {run.id})"  # type: ignore[index]
        assert bad["worker"].startswith("rig-b@")  # type: ignore[index]
    finally:
        process.terminate()
        process.wait(timeout=30)
