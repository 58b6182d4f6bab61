"""Faults: a node lost mid-job, and a broker that goes away and comes back."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from coordinator import JobState, submit
from coordinator.broker import redact
from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer
from tests.helpers import BIN, REPO, echo_job, run_cli
from tests.waiting import wait_for

# Unacked jobs come back after this many seconds (short, for the test).
VISIBILITY_S = 5


@contextmanager
def cluster_with_visibility(tmp_path: Path, seconds: int) -> Iterator[tuple[LocalCluster,
                                                                            RedisServer]]:
    with RedisServer() as server, LocalCluster(
        ["rig-x"], scripts_dir=REPO, workdir=tmp_path, log_dir=tmp_path / "worker-logs",
        broker_url=server.url,
        extra_env={"SC_VISIBILITY_TIMEOUT": str(seconds), "SC_RESTORE_INTERVAL": "1"},
    ) as cluster:
        yield cluster, server


@pytest.fixture()
def fault_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, RedisServer]]:
    with cluster_with_visibility(tmp_path, VISIBILITY_S) as made:
        yield made




def test_job_lost_with_its_worker_is_delivered_again(
    fault_cluster: tuple[LocalCluster, RedisServer], tmp_path: Path
) -> None:
    cluster, _ = fault_cluster
    run = submit([echo_job("long", "rig-x", "o", "--sleep", "4")], output_dir="lost",
                 broker_url=cluster.broker_url)
    wait_for(lambda: run.status().jobs[0].state is JobState.RUNNING, 60, "the job to start")
    cluster.kill_worker("rig-x")  # SIGKILL: the node dies mid-job, nothing is acked
    assert not (tmp_path / "lost" / "long.json.done").exists()
    def shown() -> str:
        return run_cli("status", run.id, "--broker", cluster.broker_url).stdout

    # status reads the presence registry: a worker killed outright is gone from it in 10 s
    # (PRESENCE_TTL_S), before its job's lease expires (30 s) and the job is requeued.
    wait_for(lambda: "node rig-x (no worker running):" in shown(), 25,
             "status to see the killed worker gone")
    assert "does not answer: the job runs again once a worker serves rig-x" in shown()
    cluster.start_worker("rig-x")
    cluster.wait_ready(["rig-x"])
    status = run.wait(timeout=90)
    job = status.jobs[0]
    assert job.state is JobState.SUCCEEDED
    assert job.attempts == 2
    assert (tmp_path / "lost" / "long.json.done").exists()
    log = (tmp_path / "lost" / "logs" / "long.log").read_text()
    assert "attempt 1 of long" in log and "attempt 2 of long" in log


def test_workers_survive_a_broker_restart(
    fault_cluster: tuple[LocalCluster, RedisServer], tmp_path: Path
) -> None:
    cluster, server = fault_cluster
    first = submit([echo_job("before", "rig-x")], output_dir="restart",
                   broker_url=cluster.broker_url)
    assert first.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    server.stop()
    time.sleep(1.0)
    server.start()  # same port, empty: the worker must reconnect by itself
    run = submit([echo_job("after", "rig-x")], output_dir="restart",
                 broker_url=cluster.broker_url)
    assert run.wait(timeout=90).jobs[0].state is JobState.SUCCEEDED
    assert (tmp_path / "restart" / "after.json.done").exists()
    assert cluster.workers["rig-x"].poll() is None


def test_a_job_longer_than_the_visibility_timeout_runs_once(tmp_path: Path) -> None:
    """The message comes back while the job still runs; the .done marker stops a rerun."""
    record = tmp_path / "ran.jsonl"
    with cluster_with_visibility(tmp_path, 2) as (cluster, _):
        run = submit([echo_job("slow", "rig-x", "o", "--sleep", "5", "--record", str(record))],
                     output_dir="twice", broker_url=cluster.broker_url)
        job = run.wait(timeout=90).jobs[0]
        assert job.state is JobState.SUCCEEDED and job.attempts == 1
        # The scenario does happen: the worker is handed the same message a second time,
        # and that copy ends (finding the marker) without running the script again.
        worker_log = tmp_path / "worker-logs" / "worker-rig-x.log"
        wait_for(lambda: worker_log.read_text().count(f"[{job.task_id}] succeeded") == 2, 60,
                 "the redelivered copy to be taken and finished")
        assert worker_log.read_text().count(f"[{job.task_id}] received") == 2
        assert run.status().jobs[0].state is JobState.SUCCEEDED
        log = (tmp_path / "twice" / "logs" / "slow.log").read_text()
        assert log.count("attempt ") == 1
    assert len(record.read_text().splitlines()) == 1


def test_wait_reports_a_broker_gone_for_good_as_exit_3(tmp_path: Path) -> None:
    with RedisServer() as server:
        run = submit([echo_job("waiting", "rig-nobody")], output_dir="o", broker_url=server.url)
        client = redis.Redis.from_url(server.url)
        before = len(client.client_list())
        waiter = subprocess.Popen([str(BIN / "coordinator"), "wait", run.id, "--broker",
                                   server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, "SC_RECONNECT_TIMEOUT": "3"})
        try:
            # Following: the waiter's own connections show in Redis' client list.
            wait_for(lambda: len(client.client_list()) > before, 60, "the waiter to connect")
            client.close()
            assert waiter.poll() is None  # still following the queued job
            server.stop()
            _, stderr = waiter.communicate(timeout=60)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
    assert waiter.returncode == 3
    assert "coordinator: lost the connection to Redis" in stderr
    assert "reconnecting for up to 3 s (SC_RECONNECT_TIMEOUT)" in stderr
    assert "coordinator: error: Redis at 127.0.0.1:" in stderr
    assert "did not come back within 3 s" in stderr
    assert "Traceback" not in stderr


def test_a_broker_error_from_kombu_mid_command_is_one_line_and_exit_3(
        capsys: pytest.CaptureFixture[str]) -> None:
    """kombu's ``OperationalError`` (a publish, or a question to the workers, on a broker that
    went away) is no redis-py error: a command that meets it ends as one that lost Redis."""
    import argparse
    import signal

    from kombu.exceptions import OperationalError

    from coordinator.cli.common import run_cli as run_handler

    def handler(args: argparse.Namespace) -> int:
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert run_handler(handler, argparse.Namespace()) == 3
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err == ("coordinator: error: lost the connection to Redis: Error "
                                       "111 connecting to 127.0.0.1:1. Connection refused.\n")


def test_passwords_are_masked_in_errors() -> None:
    assert redact("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact("redis://user:s3cret@127.0.0.1/0") == "redis://user:***@127.0.0.1/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# Fields of a finished run's records rewritten by hand: valid JSON of the wrong kind.
WRONG_KINDS = {
    "attempts": {"attempts": '"abc"'},
    "times": {"started_at": '"x"', "finished_at": "[1]", "duration_s": '"d"'},
    "history": {"history": '[{"elapsed_s": "x", "cpu_s": [], "attempt": [2], '
                           '"exit_code": "e", "started_at": "q", "node": 5}]'},
    "copy": {"copy": '{"state": "nope", "task_id": 5}'},
    "error": {"error": '{"a": 1}', "exit_code": '"q"', "host": "5"},
    "spec": {"spec": '{"args": 5, "gpu_id": "x", "log_file": 3, "output_file": []}'},
    "node": {"node": "5"},
}


def test_records_edited_by_hand_with_json_of_the_wrong_kind_cost_no_command_its_life(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Anyone who can write to Redis can rewrite a record. A field of the wrong kind is read as
    no field, a state that is none of this version's makes its job lost (the record says
    nothing a worker can move on from), a counter or a run state of the wrong kind is
    ignored: every command that reads the run ends as the jobs' states say, without a
    traceback."""
    from worker_tasks.tracking import busy_key, counts_key, job_key, run_key

    names = [*WRONG_KINDS, "state"]
    run = submit([echo_job(name, "rig-nowhere", "o") for name in names], output_dir="o",
                 broker_url=redis_server.url, workdir=tmp_path)
    client = redis.Redis.from_url(redis_server.url)
    for name, fields in WRONG_KINDS.items():
        client.hset(job_key(run.id, name), mapping={"state": '"failed"', **fields})
    client.hset(job_key(run.id, "state"), "state", '"zzz"')
    client.hset(run_key(run.id), mapping={"state": "5", "created_at": '"x"'})
    client.hset(counts_key(run.id), mapping={"zzz": "3", "queued": "abc"})
    client.hset(busy_key(), "rig-garbled", "abc")  # a node's busy seconds, for metrics

    broker = ("--broker", redis_server.url)
    try:
        outputs = {command[0]: run_cli(*command, *broker, cwd=tmp_path) for command in (
            ("status", run.id), ("wait", run.id, "--timeout", "30"), ("acct", run.id),
            ("collect", run.id, "--workdir", str(tmp_path)),
            ("report", run.id, "--out", str(tmp_path / "report.html")),
            ("metrics", "--textfile", str(tmp_path / "metrics.prom")))}
    finally:
        client.hdel(busy_key(), "rig-garbled")
    for command, result in outputs.items():
        shown = result.stdout + result.stderr
        assert "Traceback" not in shown, (command, shown)
    assert (outputs["status"].returncode, outputs["wait"].returncode) == (1, 1)
    assert outputs["metrics"].returncode == 0, outputs["metrics"].stderr
    assert 'its record\'s state "zzz" is none this version knows' in outputs["status"].stdout
    states = {job.job_id: job.state for job in run.status().jobs}
    assert states == {**dict.fromkeys(WRONG_KINDS, JobState.FAILED), "state": JobState.LOST}
    history = next(job.history for job in run.status().jobs if job.job_id == "history")
    assert history == [{}]  # each field of its one entry was of the wrong kind
