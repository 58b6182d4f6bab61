"""Faults against real Redis and real workers: nothing lost, nothing stuck, nothing run twice.

The jobs run ``tests/probe_job.py``, which keeps an append-only ledger of its own
executions and takes a lock per job and per node while it runs; a lock it
cannot take is written down as a violation. So each test can assert the exact
accounting: every job succeeded exactly once (or failed with a stated reason),
no two copies of a job and no two jobs of a node ever ran at once, no record is
left ``running`` or ``queued`` once the run is final, and nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator import JobState, get_run, submit
from coordinator.local import LocalCluster, worker_name
from coordinator.redis_server import RedisServer, free_port
from tests.helpers import BIN, REPO, default_sigint, run_cli, write_jobs
from tests.waiting import alive, pool_process, wait_for
from worker_tasks.celery_app import make_app
from worker_tasks.spec import RUN_JOB_TASK

# Unacknowledged jobs come back after this many seconds in these tests.
VISIBILITY_S = 8


@dataclass
class Bench:
    """A private Redis, workers for some nodes, and the probe's ledger directory."""

    cluster: LocalCluster
    server: RedisServer
    ledger: Path
    workdir: Path

    def job(self, job_id: str, node: str, *extra: Any, **fields: Any) -> dict[str, Any]:
        return {"job_id": job_id, "script": "tests/probe_job.py", "node": node,
                "args": ["--ledger", str(self.ledger), "--output-file", f"o/{job_id}.json",
                         *map(str, extra)], **fields}

    def ledger_of(self, job_id: str) -> list[list[str]]:
        path = self.ledger / f"{job_id}.ledger"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def successes(self, job_id: str) -> int:
        return sum(1 for entry in self.ledger_of(job_id) if entry[0] == "end" and entry[2] == "0")

    def violations(self) -> list[str]:
        path = self.ledger / "violations"
        return path.read_text().splitlines() if path.exists() else []


@contextmanager
def make_bench(tmp_path: Path, nodes: list[str], persistent: bool = False,
               env: dict[str, str] | None = None) -> Iterator[Bench]:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    with RedisServer(persistent=persistent) as server, LocalCluster(
            nodes, scripts_dir=REPO, workdir=tmp_path, log_dir=tmp_path / "worker-logs",
            broker_url=server.url,
            extra_env={"SC_VISIBILITY_TIMEOUT": str(VISIBILITY_S), "SC_RESTORE_INTERVAL": "1",
                       **(env or {})}) as cluster:
        yield Bench(cluster, server, ledger, tmp_path)


@pytest.fixture()
def bench(tmp_path: Path) -> Iterator[Bench]:
    with make_bench(tmp_path, ["rig-a", "rig-b"]) as made:
        yield made






def cwd_of(proc_entry: Path) -> str | None:
    try:
        return os.readlink(proc_entry / "cwd")
    except OSError:
        return None


def command_of(pid: int) -> str:
    """A process's command line, for a failure message."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "(gone)"


def works_under(proc_entry: Path, root: Path) -> bool:
    """The process works in ``root`` or below it (not merely in a name that starts alike:
    ``test_x1`` is no parent of ``test_x10``)."""
    cwd = cwd_of(proc_entry)
    return cwd is not None and Path(cwd).is_relative_to(root)


def env_for(server: RedisServer, **extra: str) -> dict[str, str]:
    return {**os.environ, "SC_BROKER_URL": server.url, **extra}


@contextmanager
def waiter_of(bench: Bench, run_id: str, reconnect_s: int, **env: str) -> Iterator[
        tuple[subprocess.Popen[bytes], Path, Path]]:
    """``coordinator wait RUN`` in the background, its output in files; stopped at the end."""
    out, err = bench.workdir / f"wait-{run_id}.out", bench.workdir / f"wait-{run_id}.err"
    with out.open("w") as out_fh, err.open("w") as err_fh:
        process = subprocess.Popen(
            [str(BIN / "coordinator"), "wait", run_id, "--workdir", str(bench.workdir)],
            cwd=bench.workdir, stdout=out_fh, stderr=err_fh,
            env=env_for(bench.server, SC_RECONNECT_TIMEOUT=str(reconnect_s), **env))
    try:
        yield process, out, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_worker_killed_while_its_run_is_busy_is_seen_dead_without_waiting_for_quiet(
        tmp_path: Path) -> None:
    """``wait`` settles the running records while other jobs keep moving: a node killed
    mid-job has its attempt requeued (its message returned) once its lease lapses, not only
    once the whole run goes quiet, so the job runs again while the run still has work."""
    with make_bench(tmp_path, ["rig-a", "rig-b"], env={"SC_LEASE_TTL": "4"}) as bench:
        jobs = [bench.job("doomed", "rig-a", "--durations", "60,0.2"),
                *(bench.job(f"steady{i:02d}", "rig-b", "--sleep", "0.5") for i in range(40))]
        run = submit(jobs, output_dir="o", broker_url=bench.server.url)
        with waiter_of(bench, run.id, 60, SC_RECONCILE_AFTER="1", SC_RETURN_AFTER="2") as (
                waiter, out, err):
            wait_for(lambda: len(bench.ledger_of("doomed")) == 1, 60, "the doomed job to start")
            bench.cluster.kill_worker("rig-a")
            wait_for(lambda: "doomed: requeued" in err.read_text(), 30,
                     "wait to requeue the killed worker's job", seen=err.read_text)
            left = [job.job_id for job in run.status().jobs
                    if job.job_id.startswith("steady") and not job.state.is_final]
            assert left, "rig-b's jobs all ended first: the run was not busy"
            bench.cluster.start_worker("rig-a")
            waiter.wait(timeout=120)
        assert waiter.returncode == 0, out.read_text() + err.read_text()
        doomed = next(job for job in run.status().jobs if job.job_id == "doomed")
        assert doomed.state is JobState.SUCCEEDED
        assert "died with its worker" in doomed.history[0]["error"], doomed.history
        assert bench.successes("doomed") == 1 and bench.violations() == []


def test_redis_killed_mid_run_with_persistence_converges_and_wait_returns(
        tmp_path: Path) -> None:
    """Jobs that finish while Redis is away keep their final state and wait returns."""
    with make_bench(tmp_path, ["rig-a", "rig-b"], persistent=True) as bench:
        # 6 s: the waiter, a fresh process, may take seconds to print on a loaded machine.
        jobs = [bench.job(f"j{i}", ("rig-a", "rig-b")[i % 2], "--sleep", "6") for i in range(4)]
        run = submit(jobs, output_dir="o", broker_url=bench.server.url)
        with waiter_of(bench, run.id, 120) as (waiter, out, err):
            # The waiter follows the run (it printed the running jobs) before Redis dies.
            wait_for(lambda: err.read_text().count(" running") >= 2, 60,
                     "the waiter to see the first jobs run")
            bench.server.kill()  # the broker and tracking Redis crash mid-run
            assert bench.successes("j0") == 0 and bench.successes("j1") == 0, \
                "the jobs ended before Redis died: the kill did not land mid-job"
            wait_for(lambda: bench.successes("j0") == 1 and bench.successes("j1") == 1, 30,
                     "the running scripts to finish while Redis is down")
            # Their workers hold the final state (and the marker) until Redis answers.
            assert not (tmp_path / "o" / "j0.json.done").exists()
            bench.server.start()  # same port, same append-only file
            waiter.wait(timeout=180)
        assert waiter.returncode == 0, out.read_text() + err.read_text()
        assert "lost the connection to Redis" in err.read_text()
        assert "reconnected to Redis after" in err.read_text()
        assert "4/4 succeeded" in out.read_text()
        status = get_run(run.id, bench.server.url).status()
        assert {job.state for job in status.jobs} == {JobState.SUCCEEDED}
        assert all(bench.successes(f"j{i}") == 1 for i in range(4))
        assert bench.violations() == []


def test_redis_restarted_empty_says_the_run_vanished_and_recover_finishes_it(
        tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a"]) as bench:
        # c runs until the test opens its gate: the waiter sees it run, however slow it starts.
        gate = tmp_path / "gate"
        jobs = [bench.job("a", "rig-a"), bench.job("b", "rig-a"),
                bench.job("c", "rig-a", "--sleep", "120", "--until", gate), bench.job("d", "rig-a")]
        jobs_file = write_jobs(tmp_path / "jobs.json", jobs)
        run = submit(jobs_file, output_dir="o", broker_url=bench.server.url, workdir=tmp_path)
        with waiter_of(bench, run.id, 60) as (waiter, _, err_file):
            wait_for(lambda: " c running" in err_file.read_text(), 60, "the waiter to see c run")
            bench.server.kill()
            bench.server.start()  # no persistence: every record and queued message is gone
            gate.touch()
            waiter.wait(timeout=120)
        err = err_file.read_text()
        assert waiter.returncode == 4, err
        assert f"run {run.id}: its records vanished from Redis while it was being followed" \
            in err
        assert f"coordinator recover --jobs-file {jobs_file} --output-dir o" in err
        wait_for(lambda: (tmp_path / "o" / "c.json.done").exists(), 30, "c to finish anyway")
        assert bench.successes("d") == 0  # its message died with Redis' memory
        recovered = run_cli("recover", "--jobs-file", str(jobs_file), "--output-dir", "o",
                            "--wait", "--timeout", "120", cwd=tmp_path,
                            env={"SC_BROKER_URL": bench.server.url})
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        assert "3 jobs already done (their .done exists)" in recovered.stderr
        assert "4/4 succeeded" in recovered.stdout
        assert [bench.successes(job) for job in "abcd"] == [1, 1, 1, 1]


def test_purged_messages_make_jobs_lost_and_retry_lost_runs_them(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a"]) as bench:
        jobs = [bench.job(f"p{i}", "rig-q") for i in range(3)] + [bench.job("ok", "rig-a")]
        run = submit(jobs, output_dir="o", broker_url=bench.server.url)
        broker = redis.Redis.from_url(bench.server.url)
        assert broker.llen("node.rig-q") == 3
        purged = subprocess.run([str(BIN / "celery"), "-A", "worker_tasks", "purge", "-f",
                                 "-Q", "node.rig-q"], env=env_for(bench.server), cwd=REPO,
                                capture_output=True, text=True, timeout=60, check=False)
        assert purged.returncode == 0, purged.stderr
        assert broker.llen("node.rig-q") == 0
        status = run_cli("status", run.id, env={"SC_BROKER_URL": bench.server.url},
                         cwd=tmp_path)
        assert status.returncode == 1, status.stderr  # lost jobs: status says so, exit 1
        # status only marks them (wait would publish them again): the user decides.
        assert ("3 jobs lost (their messages are gone and no worker runs them): p0, p1, p2; "
                f"coordinator retry --lost {run.id} republishes them") in status.stderr
        states = {job.job_id: job.state for job in run.wait(timeout=60).jobs}
        assert states == {"p0": JobState.LOST, "p1": JobState.LOST, "p2": JobState.LOST,
                          "ok": JobState.SUCCEEDED}
        bench.cluster.nodes.append("rig-q")
        bench.cluster.start_worker("rig-q")
        bench.cluster.wait_ready(["rig-q"])
        retried = run_cli("retry", run.id, "--lost", "--wait", "--timeout", "60",
                          env={"SC_BROKER_URL": bench.server.url}, cwd=tmp_path)
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert "published 3 lost jobs again" in retried.stdout
        assert [bench.successes(f"p{i}") for i in range(3)] == [1, 1, 1]


def test_a_killed_workers_job_runs_once_its_node_is_back_not_after_the_visibility_timeout(
        tmp_path: Path) -> None:
    """kombu's own default stays (12 h), and a worker started again knows nothing of the
    message its predecessor left unacknowledged: the head that follows the run puts it back
    in the node's queue, and the job runs again, once."""
    with make_bench(tmp_path, ["rig-a"],
                    env={"SC_VISIBILITY_TIMEOUT": "43200", "SC_LEASE_TTL": "4"}) as bench:
        run = submit([bench.job("back", "rig-a", "--sleep", "2")], output_dir="o",
                     broker_url=bench.server.url)
        wait_for(lambda: len(bench.ledger_of("back")) == 1, 60, "the job to start")
        bench.cluster.kill_worker("rig-a")  # SIGKILL: its message stays unacknowledged
        bench.cluster.start_worker("rig-a")
        bench.cluster.wait_ready(["rig-a"])
        notices: list[str] = []
        status = run.wait(timeout=90, notice=notices.append)
        assert status.all_succeeded, (status.line(), notices)
        assert any(line.startswith("back: its message, left unacknowledged by worker rig-a@")
                   and line.endswith("is back in its queue") for line in notices), notices
        assert [entry[0] for entry in bench.ledger_of("back")] == ["start", "start", "end"]
        assert bench.successes("back") == 1 and bench.violations() == []


# A consumer that takes one message from node.rig-q unacknowledged and dies at once: kombu's
# tidy close would put it back itself (a SIGKILLed worker's does not).
TAKE_AND_DIE = """
import os, sys
from worker_tasks.celery_app import make_app
with make_app(sys.argv[1]).connection_for_write() as connection:
    message = connection.default_channel.basic_get("node.rig-q", no_ack=False)
    print(message.headers["id"], flush=True)
    os._exit(0)
"""


def test_only_a_message_delivered_before_the_dead_attempt_started_goes_back(
        redis_server: RedisServer) -> None:
    """``return_unacked`` restores a dead worker's delivery, never a later (live) one."""
    from coordinator.reconcile import return_unacked

    app = make_app(redis_server.url)
    broker = redis.Redis.from_url(redis_server.url)
    broker.delete("node.rig-q")
    before = time.time()
    app.send_task(RUN_JOB_TASK, args=[{}], queue="node.rig-q", task_id="held-1")
    taken = subprocess.run([sys.executable, "-c", TAKE_AND_DIE, redis_server.url],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert taken.stdout.strip() == "held-1", taken.stderr
    assert broker.llen("node.rig-q") == 0 and broker.hlen("unacked") >= 1
    # Delivered after the attempt "started": a live delivery, left alone.
    assert return_unacked(app, {"held-1": before}) == set()
    assert broker.llen("node.rig-q") == 0
    assert return_unacked(app, {"held-1": time.time()}) == {"held-1"}
    assert broker.llen("node.rig-q") == 1
    assert all(b"held-1" not in entry for entry in broker.hvals("unacked"))
    assert return_unacked(app, {"held-1": time.time()}) == set()  # once


def test_returning_messages_while_the_broker_is_away_returns_none_and_raises_nothing() -> None:
    """The head's next settle tries again; ``wait`` must not die of it."""
    from coordinator.reconcile import return_unacked

    dead = make_app(f"redis://127.0.0.1:{free_port()}/0")
    assert return_unacked(dead, {"held-1": time.time()}) == set()


def test_a_broker_that_fails_the_scheduler_costs_wait_a_notice_not_its_life(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracking Redis answers, the broker does not (kombu's ``OperationalError``, which
    is no redis-py error): the follower says so and goes on polling, to its own timeout."""
    from coordinator import scheduler
    from coordinator.errors import WaitTimeoutError
    from coordinator.follow import FollowOptions, follow
    from coordinator.scheduler import Scheduler, SchedulerOptions

    monkeypatch.setattr(scheduler, "RECONCILE_AFTER_S", 0.5)
    run = submit([{"job_id": "j", "script": "examples/write_output.py", "node": "rig-q",
                   "args": ["--output-file", "o/j.json"]}], output_dir="o",
                 broker_url=redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    assert client.delete("node.rig-q") == 1  # lost: the settle publishes it again, and fails
    notices: list[str] = []
    dead = make_app(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(WaitTimeoutError):
        follow(client, run.id, None, FollowOptions(timeout=4, notice=notices.append),
               Scheduler(client, dead, client, run.id, SchedulerOptions(notice=notices.append)))
    assert any(line.startswith("the broker did not answer the scheduler (") and
               line.endswith("it tries again on a later poll") for line in notices), notices


def test_a_script_never_outlives_the_loop_that_watches_it(bench: Bench) -> None:
    """Whatever ends the worker's watch over a running script ends the script too, before the
    slot's lease is given back and the node's next job starts. Here it is a Celery soft time
    limit (an operator's ``--soft-time-limit``), which raises ``SoftTimeLimitExceeded`` in
    the pool process wherever it is: sent as Celery sends it, SIGUSR1 to the pool process,
    mid-watch. The job fails as a worker error, its script killed at once."""
    jobs = [bench.job("limited", "rig-a", "--sleep", "60"), bench.job("next", "rig-a")]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url, workdir=bench.workdir)
    wait_for(lambda: len(bench.ledger_of("limited")) == 1, 60, "the job to start")
    script = int(bench.ledger_of("limited")[0][2])
    os.kill(pool_process(bench.cluster.workers["rig-a"].pid), signal.SIGUSR1)
    # The script dies with the watch, not 60 s later.
    wait_for(lambda: not alive(script), 20, "the limited job's script to be killed")
    jobs = {job.job_id: job for job in run.wait(timeout=60).jobs}
    assert jobs["limited"].state is JobState.FAILED
    assert jobs["limited"].error.startswith("worker error: SoftTimeLimitExceeded"), \
        jobs["limited"]
    assert jobs["next"].state is JobState.SUCCEEDED
    assert [entry[0] for entry in bench.ledger_of("limited")] == ["start"]  # killed mid-sleep
    assert bench.violations() == []


def test_a_running_job_edited_by_hand_ends_as_its_script_did(bench: Bench) -> None:
    """Anyone who can write to Redis can rewrite a running job's record. A field that is not
    JSON (``attempts``) or is JSON of the wrong kind (``copy``, ``history``), a slot speed or
    a duration of its script garbled: the worker's watch, its transitions and the head read
    each as no field. Both jobs run to their success, once, their records final."""
    from worker_tasks.speeds import SlotSpeeds, speeds_key
    from worker_tasks.tracking import job_key, run_key

    script = "tests/probe_job.py"
    jobs = [bench.job("edited", "rig-a", "--sleep", "3"),
            bench.job("garbled", "rig-b", "--sleep", "3")]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url, workdir=bench.workdir)
    client = redis.Redis.from_url(bench.server.url)
    wait_for(lambda: len(bench.ledger_of("edited")) == 1 and len(bench.ledger_of("garbled")) == 1,
             60, "both jobs to start")
    client.hset(job_key(run.id, "edited"), mapping={"copy": "5", "history": '"x"'})
    client.hset(job_key(run.id, "garbled"), "attempts", "abc{")
    client.hset(speeds_key(script), mapping={"rig-a": '"fast"', "rig-b": "[1]"})
    client.rpush(f"{run_key(run.id)}:durations:{script}", "abc")
    assert SlotSpeeds(client).of(script) == {}  # the garbled speeds: as if never measured

    jobs = {job.job_id: job for job in run.wait(timeout=60).jobs}
    assert (jobs["edited"].state, jobs["garbled"].state) == (JobState.SUCCEEDED,) * 2, jobs
    # The edited history is read as none: the attempt's own entry starts a new one.
    assert [entry["attempt"] for entry in jobs["edited"].history] == [1]
    assert set(SlotSpeeds(client).of(script)) == {"rig-a", "rig-b"}  # measured afresh
    assert bench.successes("edited") == 1 and bench.successes("garbled") == 1
    assert bench.violations() == []


def test_wait_publishes_a_vanished_message_again_once(tmp_path: Path) -> None:
    """A broker crash mid-delivery loses the message (kombu pops, then records): wait heals it.

    Deleting a node's queue while ``wait`` follows is that loss, made on purpose: the job is
    published again and runs exactly once; lost a second time, it stays lost.
    """
    with make_bench(tmp_path, ["rig-a"]) as bench:
        run = submit([bench.job("once", "rig-q"), bench.job("twice", "rig-r")], output_dir="o",
                     broker_url=bench.server.url)
        broker = redis.Redis.from_url(bench.server.url)
        assert broker.delete("node.rig-q", "node.rig-r") == 2
        with waiter_of(bench, run.id, 60, SC_RECONCILE_AFTER="1") as (waiter, out, err):
            wait_for(lambda: broker.llen("node.rig-q") == 1 and broker.llen("node.rig-r") == 1,
                     60, "both jobs to be published again")
            assert "2 jobs lost (their messages are gone and no worker runs them): once, " \
                   "twice; published again" in err.read_text()
            assert broker.delete("node.rig-r") == 1
            wait_for(lambda: "1 jobs lost (their messages are gone and no worker runs them): "
                             f"twice; coordinator retry --lost {run.id}" in err.read_text(),
                     60, "the second loss to be reported", seen=err.read_text)
            bench.cluster.nodes.append("rig-q")
            bench.cluster.start_worker("rig-q")
            waiter.wait(timeout=120)
        assert waiter.returncode == 1, out.read_text() + err.read_text()
        states = {job.job_id: job.state for job in run.status().jobs}
        assert states == {"once": JobState.SUCCEEDED, "twice": JobState.LOST}
        assert bench.successes("once") == 1 and bench.ledger_of("twice") == []
        assert bench.violations() == []


def test_one_job_at_a_time_per_node_even_with_a_second_worker_and_pool_grow(
        tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a"]) as bench:
        app = make_app(bench.server.url)
        replies = app.control.pool_grow(1, reply=True, destination=[worker_name("rig-a")])
        assert replies and "refused by scripts-coordinator" in \
            replies[0][worker_name("rig-a")]["error"]
        replies = app.control.add_consumer("node.rig-b", reply=True,
                                           destination=[worker_name("rig-a")])
        assert "refused" in replies[0][worker_name("rig-a")]["error"]
        # A second worker process for the same node (what --force allows): the lease holds.
        second = subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker_tasks", "worker", "--queues", "node.rig-a",
             "--concurrency", "1", "--prefetch-multiplier", "1", "--hostname",
             "rig-a-second@%h", "--without-gossip", "--without-mingle"],
            cwd=tmp_path, env=bench.cluster.worker_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(lambda: any("rig-a-second@" in name for reply in
                                 app.control.ping(timeout=1) or [] for name in reply),
                     60, "the second worker")
            jobs = [bench.job(f"n{i}", "rig-a", "--sleep", "0.3") for i in range(8)]
            run = submit(jobs, output_dir="o", broker_url=bench.server.url)
            status = run.wait(timeout=120)
            hosts = {job.host.split("@")[0] for job in status.jobs}
            assert hosts == {"rig-a", "rig-a-second"}  # both processes took jobs ...
            assert bench.violations() == []  # ... never two at once
            spans = sorted((float(start[3]), float(end[3])) for job in jobs
                           for start, end in [bench.ledger_of(job["job_id"])])
            assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:],
                                                                         strict=False))
        finally:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(timeout=30)


def test_move_and_failover_take_jobs_off_a_dead_node_but_not_pinned_ones(
        tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a", "rig-b"]) as bench:
        jobs = [bench.job(f"m{i}", "rig-dead") for i in range(4)]
        jobs.append(bench.job("pinned", "rig-dead", pin=True))
        run = submit(jobs, output_dir="o", broker_url=bench.server.url)
        moved = run_cli("move", run.id, "--from", "rig-dead", "--to", "rig-a,rig-b",
                        env={"SC_BROKER_URL": bench.server.url})
        assert moved.returncode == 0, moved.stderr
        assert redis.Redis.from_url(bench.server.url).llen("node.rig-dead") == 1  # the pinned
        assert "moved 2 jobs from rig-dead to rig-a" in moved.stdout
        assert "moved 2 jobs from rig-dead to rig-b" in moved.stdout
        wait_for(lambda: all(bench.successes(f"m{i}") == 1 for i in range(4)), 60,
                 "the moved jobs to run")
        by_id = {job.job_id: job for job in run.status().jobs}
        assert by_id["pinned"].state is JobState.QUEUED and by_id["pinned"].node == "rig-dead"
        assert {by_id[f"m{i}"].moved_from for i in range(4)} == {"rig-dead"}
        # rig-dead comes back: its stale messages are dropped, the pinned job runs there.
        bench.cluster.nodes.append("rig-dead")
        bench.cluster.start_worker("rig-dead")
        bench.cluster.wait_ready(["rig-dead"])
        final = run.wait(timeout=60)
        assert {job.state for job in final.jobs} == {JobState.SUCCEEDED}
        assert all(bench.successes(f"m{i}") == 1 for i in range(4))
        assert bench.successes("pinned") == 1
        # The move deleted the old messages: the returning worker finds none to drop.
        log = (tmp_path / "worker-logs" / "worker-rig-dead.log").read_text()
        assert log.count("; dropped without running") == 0

        # --failover: a node without a worker for 2 s has its queued jobs moved by wait.
        more = [bench.job(f"f{i}", "rig-gone") for i in range(3)] + [bench.job("f_ok", "rig-a")]
        jobs_file = write_jobs(tmp_path / "failover.json", more)
        result = run_cli("submit", "--jobs-file", str(jobs_file), "--output-dir", "o",
                         "--wait", "--failover", "2", "--timeout", "120", cwd=tmp_path,
                         env={"SC_BROKER_URL": bench.server.url})
        assert result.returncode == 0, result.stdout + result.stderr
        assert "failover: node rig-gone has had no worker for 2 s; moved 3 queued jobs" in \
            result.stderr
        moved_lines = [line.split() for line in result.stdout.splitlines()
                       if "jobs from rig-gone to" in line]
        assert sum(int(words[1]) for words in moved_lines) == 3
        assert {words[-1] for words in moved_lines} <= {"rig-a", "rig-b", "rig-dead"}
        summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
        assert sum(len(move["jobs"]) for move in summary["moves"]) == 3
        assert all(bench.successes(f"f{i}") == 1 for i in range(3))


def test_automatic_retries_keep_every_attempt(bench: Bench) -> None:
    jobs = [bench.job("flaky", "rig-a", "--fail-attempts", "1", retries=2, retry_delay=0.2),
            bench.job("hopeless", "rig-b", "--fail-attempts", "9", retries=1, retry_delay=0.2),
            bench.job("fine", "rig-a")]
    jobs_file = write_jobs(bench.workdir / "retry.json", jobs)
    result = run_cli("submit", "--jobs-file", str(jobs_file), "--output-dir", "o", "--wait",
                     "--timeout", "120", cwd=bench.workdir,
                     env={"SC_BROKER_URL": bench.server.url})
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((bench.workdir / "o" / "run_summary.json").read_text())
    by_id = {job["job_id"]: job for job in summary["jobs"]}
    assert by_id["flaky"]["state"] == "succeeded" and by_id["flaky"]["attempts"] == 2
    assert [a["exit_code"] for a in by_id["flaky"]["attempt_history"]] == [1, 0]
    assert by_id["hopeless"]["state"] == "failed" and by_id["hopeless"]["attempts"] == 2
    assert [a["exit_code"] for a in by_id["hopeless"]["attempt_history"]] == [1, 1]
    assert by_id["hopeless"]["error"].startswith("script exited with status 1\n"
                                                 "last lines of its output:\n")
    assert "attempt 2 of hopeless fails on purpose" in by_id["hopeless"]["error"]
    assert by_id["fine"]["attempts"] == 1
    joblog = (bench.workdir / "o" / "joblog").read_text().splitlines()
    assert joblog[0].split("\t") == ["Seq", "Host", "Starttime", "JobRuntime", "Send",
                                     "Receive", "Exitval", "Signal", "Command"]
    rows = [line.split("\t") for line in joblog[1:]]
    assert len(rows) == 5  # 2 + 2 + 1 attempts
    assert [(row[0], row[6]) for row in rows if row[0] == "1"] == [("1", "1"), ("1", "0")]
    assert all(row[1].startswith(("rig-a@", "rig-b@")) for row in rows)
    assert rows[0][8].startswith("tests/probe_job.py --ledger ")
    assert bench.successes("flaky") == 1 and bench.successes("hopeless") == 0


def test_cancel_kills_running_jobs_and_no_marker_appears(bench: Bench) -> None:
    jobs = [bench.job("long_a", "rig-a", "--sleep", "30", "--child-sleep", "60"),
            bench.job("queued_a", "rig-a"),
            bench.job("edge_b", "rig-b", "--sleep", "1.2")]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url)
    wait_for(lambda: len(bench.ledger_of("long_a")) == 1 and len(bench.ledger_of("edge_b")) == 1,
             60, "both running jobs to start")
    script_pid = int(bench.ledger_of("long_a")[0][2])
    child_pid = int((bench.ledger / "long_a.children").read_text())
    time.sleep(1.0)  # edge_b is about to finish: a cancel racing its end
    result = run_cli("cancel", run.id, env={"SC_BROKER_URL": bench.server.url})
    assert result.returncode == 0
    count = int(result.stdout.split("cancelled ")[1].split()[0])
    assert count >= 2  # long_a (running) and queued_a at least
    status = run.wait(timeout=30)
    states = {job.job_id: job.state for job in status.jobs}
    assert states["long_a"] is JobState.CANCELLED and states["queued_a"] is JobState.CANCELLED
    wait_for(lambda: not alive(script_pid) and not alive(child_pid), 10,
             "the cancelled script and its child to be killed")
    out = bench.workdir / "o"
    assert not (out / "long_a.json.done").exists() and not (out / "queued_a.json.done").exists()
    if states["edge_b"] is JobState.CANCELLED:  # lost the race: no marker, even if it ended
        wait_for(lambda: len(bench.ledger_of("edge_b")) == 2 or not alive(
            int(bench.ledger_of("edge_b")[0][2])), 10, "edge_b to end")
        assert not (out / "edge_b.json.done").exists()
    else:
        assert states["edge_b"] is JobState.SUCCEEDED and (out / "edge_b.json.done").exists()
    assert bench.successes("queued_a") == 0
    # The worker writes this line after the processes die: wait for it.
    job_log = out / "logs" / "long_a.log"
    wait_for(lambda: "cancelled while running; killed" in job_log.read_text(), 10,
             "the job log's cancel line")
    log = (bench.workdir / "worker-logs" / "worker-rig-a.log").read_text()
    assert "Traceback" not in log


def test_a_job_longer_than_the_visibility_timeout_runs_once(tmp_path: Path) -> None:
    # kombu hands an unacknowledged message out again after the visibility timeout, even while
    # its job runs: the idle slot that takes it waits for the running execution instead.
    with make_bench(tmp_path, ["rig-a", "rig-b"], env={"SC_VISIBILITY_TIMEOUT": "2"}) as bench:
        gate = tmp_path / "gate"
        run = submit([bench.job("long", "any", "--sleep", 120, "--until", gate)],
                     output_dir="o", broker_url=bench.server.url)
        logs = [bench.cluster.log_dir / f"worker-{node}.log" for node in ("rig-a", "rig-b")]
        wait_for(lambda: any("was delivered again while it runs" in log.read_text()
                             for log in logs if log.exists()), 60,
                 "the message delivered again, to the idle slot")
        gate.touch()
        job = run.wait(timeout=60).jobs[0]
    assert job.state is JobState.SUCCEEDED and job.attempts == 1, job
    assert [entry[0] for entry in bench.ledger_of("long")] == ["start", "end"]
    assert bench.violations() == []


def test_a_worker_killed_mid_job_takes_the_scripts_children_with_it(bench: Bench) -> None:
    run = submit([bench.job("orphan", "rig-b", "--sleep", "60", "--child-sleep", "60")],
                 output_dir="o", broker_url=bench.server.url)
    wait_for(lambda: (bench.ledger / "orphan.children").exists(), 60, "the job's child")
    script_pid = int(bench.ledger_of("orphan")[0][2])
    child_pid = int((bench.ledger / "orphan.children").read_text())
    bench.cluster.kill_worker("rig-b")  # SIGKILL: worker and pool process die at once
    wait_for(lambda: not alive(script_pid) and not alive(child_pid), 15,
             "the script and its child to die with the worker")
    assert run.status().jobs[0].state is JobState.RUNNING  # its message comes back later


def send_raw(server: RedisServer, message: Any, queue: str = "node.rig-a",
             task_id: str = "forged-1", **options: Any) -> None:
    app = make_app(server.url)
    app.conf.result_backend = None
    app.send_task(RUN_JOB_TASK, args=[message] if message is not ... else [], queue=queue,
                  task_id=task_id, **options)


def test_hostile_messages_are_refused_and_the_worker_lives_on(bench: Bench) -> None:
    planted = bench.workdir.parent / "planted"
    valid = {"run_id": "20261129-000000-000000", "job_id": "x", "script": "tests/probe_job.py",
             "args": ["--ledger", str(bench.ledger), "--output-file", "o/x.json"],
             "node": "rig-a", "gpu_id": 0, "output_file": "o/x.json", "done_file": "o/x.json.done",
             "log_file": "o/logs/x.log"}
    hostile = [
        {**valid, "env": {"OPENSSL_CONF": "/tmp/evil.cnf"}},
        {**valid, "env": {"BASH_ENV": "/tmp/evil.sh"}},
        {**valid, "done_file": str(planted / "x.done")},
        {**valid, "done_file": "../../planted.done"},
        {**valid, "log_file": "../outside.log"},
        {**valid, "gpu_id": "0,1,2,3"},
        {**valid, "script": "/bin/sh"},
        {key: value for key, value in valid.items() if key != "script"},
        ["not", "an", "object"],
        "a string",
        ...,  # no message at all
    ]
    for index, message in enumerate(hostile):
        send_raw(bench.server, message, task_id=f"hostile-{index}")
    # A well-formed message for a job no run knows (forged, or expired): dropped unexecuted.
    send_raw(bench.server, valid, task_id="forged-valid")
    log = bench.workdir / "worker-logs" / "worker-rig-a.log"
    wait_for(lambda: log.read_text().count("refused message hostile-") == len(hostile), 60,
             "every hostile message to be refused")
    wait_for(lambda: "no tracking record (the run expired, or a forged message)" in
             log.read_text(), 30, "the forged message to be dropped")
    assert bench.ledger_of("x") == []  # nothing executed
    assert not planted.exists() and not (bench.workdir.parent / "outside.log").exists()
    text = log.read_text()
    assert "env may not set OPENSSL_CONF" in text and "gpu_id must be an integer" in text
    assert "Traceback" not in text
    # The worker lives on and runs the next real job.
    run = submit([bench.job("after", "rig-a")], output_dir="o", broker_url=bench.server.url)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    # A pickled message is not even decoded (JSON only).
    app = make_app(bench.server.url)
    with app.producer_or_acquire() as producer:
        producer.publish({"task": RUN_JOB_TASK}, routing_key="node.rig-a", serializer="pickle",
                         headers={"task": RUN_JOB_TASK, "id": "pickled-1", "lang": "py",
                                  "argsrepr": "", "kwargsrepr": ""})
    wait_for(lambda: "pickle" in log.read_text() and "Refusing" in log.read_text(), 30,
             "the pickled message to be refused")
    # One line, naming the message; no traceback, no dump of the attacker's body.
    refusals = [line for line in log.read_text().splitlines() if "pickled-1" in line]
    assert len(refusals) == 1 and "Refusing to deserialize" in refusals[0], refusals
    assert "Traceback" not in log.read_text()


# Items anyone with write access to Redis can push straight into a node's queue, none of
# them a message: kombu used to end the worker (or drop its connection) on each.
RAW_ITEMS = [b"not json", b"\xff\xfe", b"[1, 2]", b'"a string"', b"{}", b"null",
             b'{"properties": 5}',
             b'{"properties": {"delivery_tag": "t", "delivery_info": []}, "body": ""}',
             b'{"properties": {"delivery_tag": "t", "body_encoding": "base64"}, "body": "x!"}',
             b'{"properties": {"delivery_tag": "t"}, "headers": [], "body": ""}',
             b'{"properties": {"delivery_tag": "t", "body_encoding": "rot13"}, "body": "x"}']


def test_a_raw_item_that_is_no_message_is_dropped_and_the_worker_lives_on(
        bench: Bench) -> None:
    worker = bench.cluster.workers["rig-a"]
    broker = redis.Redis.from_url(bench.server.url)
    for item in RAW_ITEMS:
        broker.lpush("node.rig-a", item)
    log = bench.workdir / "worker-logs" / "worker-rig-a.log"
    wait_for(lambda: log.read_text().count("that is no message") == len(RAW_ITEMS) or
             worker.poll() is not None, 60, "every raw item to be dropped")
    assert worker.poll() is None, "the worker died of a raw item"
    text = log.read_text()
    assert "Unrecoverable error" not in text and "Connection to broker lost" not in text
    # Each line names the queue the item was found in, the ones that are not JSON too.
    drops = [line for line in text.splitlines() if "that is no message" in line]
    assert all("queue node.rig-a that" in line for line in drops), drops
    run = submit([bench.job("after-raw", "rig-a")], output_dir="o", broker_url=bench.server.url)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    assert bench.cluster.workers["rig-a"] is worker  # the same process, never restarted


# Envelopes kombu reads well whose body is not Celery's [args, kwargs, options]: Celery
# unpacks the body outside its error handling, and each used to end the worker.
BAD_BODIES = [({"x": 1}, True), ([1, 2], True), (["a", {}, {}], True), ([[], [], {}], True),
              ([[], {}, {}], False)]


def test_a_message_of_the_wrong_shape_is_refused_and_the_worker_lives_on(
        bench: Bench) -> None:
    worker = bench.cluster.workers["rig-a"]
    app = make_app(bench.server.url)
    with app.producer_or_acquire() as producer:
        for index, (body, with_headers) in enumerate(BAD_BODIES):
            headers = {"task": RUN_JOB_TASK, "id": f"shape-{index}"} if with_headers else {}
            producer.publish(body, routing_key="node.rig-a", serializer="json",
                             headers=headers)
    log = bench.workdir / "worker-logs" / "worker-rig-a.log"
    wait_for(lambda: log.read_text().count("refused message") == len(BAD_BODIES) or
             worker.poll() is not None, 60, "every malformed message to be refused")
    assert worker.poll() is None, "the worker died of a malformed message"
    text = log.read_text()
    assert text.count("its body is not a task's [args, kwargs, options]; nothing run") == 4
    assert text.count("not a task message (no task and id headers); nothing run") == 1
    assert "Unrecoverable error" not in text and "Traceback" not in text
    run = submit([bench.job("after-shape", "rig-a")], output_dir="o",
                 broker_url=bench.server.url)
    assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
    assert bench.cluster.workers["rig-a"] is worker  # the same process, never restarted


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0",
                                 "sentinel://127.0.0.1:1;sentinel://127.0.0.1:2"])
def test_every_broker_scheme_reads_through_the_checking_transport(url: str) -> None:
    from kombu import Connection
    from kombu.transport import get_transport_cls

    from worker_tasks import transport

    make_app(url.split(";")[0])
    chosen = get_transport_cls(Connection(url).transport_cls)
    assert issubclass(chosen, transport.Transport)
    assert issubclass(chosen.Channel, transport.Channel)
    assert transport.envelope_problem({"properties": {"delivery_tag": "t"}}) is None


def test_a_message_without_a_queue_is_refused_at_the_publisher_and_shown_by_status(
        bench: Bench) -> None:
    from worker_tasks.celery_app import UnroutedJobError

    app = make_app(bench.server.url)
    with pytest.raises(UnroutedJobError, match="published without a queue"):
        app.send_task(RUN_JOB_TASK, args=[{}])
    broker = redis.Redis.from_url(bench.server.url)
    broker.lpush("node.unassigned", b"{}")  # a foreign publisher that bypassed the router
    run = submit([bench.job("u", "rig-a")], output_dir="o", broker_url=bench.server.url)
    run.wait(timeout=60)
    status = run_cli("status", run.id, env={"SC_BROKER_URL": bench.server.url})
    assert ("warning: 1 messages wait in node.unassigned, a queue no worker consumes"
            in status.stdout)


def local_running_two_slow_jobs(tmp_path: Path, output: int | None) -> tuple[
        subprocess.Popen[str], int, list[int]]:
    """`coordinator local` once its two 60 s jobs run: (it, its Redis's pid, all it started).

    Everything it starts works under ``tmp_path`` (its TMPDIR too), which is how it is found.
    """
    jobs = write_jobs(tmp_path / "jobs.json", [
        {"job_id": f"slow_{node}", "script": "examples/write_output.py",
         "args": ["--output-file", f"o/{node}.json", "--sleep", "60"], "node": node}
        for node in ("rig-a", "rig-b")])
    process = subprocess.Popen([str(BIN / "coordinator"), "local", "--jobs-file", str(jobs),
                                "--scripts-dir", str(REPO)], cwd=tmp_path,
                               stdout=output, stderr=output, text=True,
                               env={**os.environ, "TMPDIR": str(tmp_path)},
                               preexec_fn=default_sigint)
    try:
        logs = tmp_path / "full_scoring_results" / "logs"
        wait_for(lambda: len(list(logs.glob("slow_*.log"))) == 2, 120, "both jobs to run")
        (redis_dir,) = tmp_path.glob("sc-redis-*")
        started = [int(entry.name) for entry in Path("/proc").iterdir()
                   if entry.name.isdigit() and int(entry.name) != process.pid
                   and works_under(entry, tmp_path)]
        redis_pid = next(pid for pid in started if cwd_of(Path(f"/proc/{pid}")) == str(redis_dir))
        assert len(started) >= 7  # Redis, two workers with their pool processes, two scripts
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process, redis_pid, started


def test_a_second_ctrl_c_during_local_shutdown_leaks_nothing(tmp_path: Path) -> None:
    process, redis_pid, started = local_running_two_slow_jobs(tmp_path, subprocess.PIPE)
    try:
        process.send_signal(signal.SIGINT)
        for _ in range(200):  # impatient: again and again, all through the shutdown
            time.sleep(0.02)
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # 130, or killed by one of the later Ctrl-Cs once everything was already stopped.
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "stopped the local cluster" in stderr
    assert not alive(redis_pid)
    assert list(tmp_path.glob("sc-redis-*")) == []
    assert [pid for pid in started if alive(pid)] == []


def test_a_sigkilled_local_coordinator_takes_its_cluster_with_it(tmp_path: Path) -> None:
    """No handler runs on SIGKILL: Redis, the workers and their jobs die with it all the same."""
    process, redis_pid, started = local_running_two_slow_jobs(tmp_path, subprocess.DEVNULL)
    process.kill()
    process.wait()
    wait_for(lambda: not alive(redis_pid), 30, "Redis to die with the coordinator")

    def left() -> list[int]:
        # Still working under tmp_path: a pid the system gave to another process since (a
        # busy machine starts thousands) is not one of ours.
        return [pid for pid in started if alive(pid) and works_under(Path(f"/proc/{pid}"),
                                                                        tmp_path)]

    wait_for(lambda: left() == [], 60, "the workers and their jobs to die with the coordinator",
             seen=lambda: "\n".join(f"{pid}: {command_of(pid)}" for pid in left()))
    wait_for(lambda: not list(tmp_path.glob("sc-redis-*")), 30,
             "the private Redis's temporary directory to be removed")
    assert not list(tmp_path.rglob("sc-keys-*"))  # the throwaway signing key went with it


def test_local_sigkilled_as_its_first_short_job_runs_leaves_nothing(tmp_path: Path) -> None:
    """The kill lands while jobs run and others wait: workers, scripts, Redis and its
    directory are gone within a deadline (reproduced as a leak of both workers before)."""
    jobs = write_jobs(tmp_path / "jobs.json", [
        {"job_id": f"j{index}", "script": "examples/write_output.py",
         "args": ["--output-file", f"x/j{index}.json", "--sleep", "3"],
         "node": ("rig-a", "rig-b")[index % 2]} for index in range(8)])
    process = subprocess.Popen([str(BIN / "coordinator"), "local", "--jobs-file", str(jobs),
                                "--output-dir", "out", "--scripts-dir", str(REPO),
                                "--workdir", "."], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        wait_for(lambda: list((tmp_path / "out" / "logs").glob("j*.log")), 120,
                 "the first job to run")
    finally:
        process.kill()
        process.wait()

    def leftovers() -> list[int]:
        return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
                and works_under(entry, tmp_path)]

    wait_for(lambda: leftovers() == [], 60, "every process of the local cluster to end",
             seen=lambda: "\n".join(f"{pid}: {command_of(pid)}" for pid in leftovers()))
    wait_for(lambda: not list(tmp_path.glob("sc-redis-*")), 30,
             "the private Redis's temporary directory to be removed")


def test_a_worker_stops_in_bounded_time_when_its_broker_is_gone(tmp_path: Path) -> None:
    """Warm stop: the running job finishes, then the worker exits though Redis is dead."""
    with make_bench(tmp_path, ["rig-a"], env={"SC_STOP_GRACE": "3"}) as bench:
        submit([bench.job("last", "rig-a", "--sleep", "3")], output_dir="o",
               broker_url=bench.server.url)
        wait_for(lambda: len(bench.ledger_of("last")) == 1, 60, "the job to start")
        worker = bench.cluster.workers["rig-a"]
        bench.server.kill()
        log_file = bench.workdir / "worker-logs" / "worker-rig-a.log"
        wait_for(lambda: "Cannot connect to" in log_file.read_text(), 30,
                 "the worker to find its broker gone")
        worker.send_signal(signal.SIGTERM)
        wait_for(lambda: len(bench.ledger_of("last")) == 2, 30,
                 "the running job to finish first (a warm stop)")
        wait_for(lambda: worker.poll() is not None, 30,
                 "the worker to exit with its broker gone")
        assert bench.successes("last") == 1
        assert "killing its pool and exiting" in log_file.read_text()


def test_status_shows_at_most_one_running_job_per_node_after_kills(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a"]) as bench:
        jobs = [bench.job(f"k{i}", "rig-a", "--sleep", "20") for i in range(3)]
        run = submit(jobs, output_dir="o", broker_url=bench.server.url)
        for _ in range(2):  # kill the worker mid-job twice: two dead attempts
            wait_for(lambda: sum(job.state is JobState.RUNNING for job in run.status().jobs)
                     >= 1 and any(alive(int(entry[2])) for job in jobs
                                  for entry in bench.ledger_of(job["job_id"])[-1:]
                                  if entry[0] == "start"), 60, "a job to run")
            bench.cluster.kill_worker("rig-a")
            bench.cluster.start_worker("rig-a")
            bench.cluster.wait_ready(["rig-a"])
        wait_for(lambda: sum(1 for job in jobs for entry in bench.ledger_of(job["job_id"])
                             if entry[0] == "start") >= 3, 60, "the third attempt to start")
        result = run_cli("status", run.id, env={"SC_BROKER_URL": bench.server.url})
        assert result.returncode == 0, result.stderr
        running = [line for line in result.stdout.splitlines() if " running " in line]
        assert len(running) == 1, result.stdout
        assert "requeued" in result.stderr
        assert bench.violations() == []



@pytest.mark.alone  # six workers, three SIGKILLed, with 4 s leases: the width test
def test_killed_workers_attempts_are_kept_failover_spreads_and_no_stale_message_is_left(
        tmp_path: Path) -> None:
    """Three of six workers SIGKILLed mid-job under --failover (issue 21, items 1-3 and 6)."""
    from celery.events.state import State

    live_nodes, dead_nodes = ["rig-a", "rig-b", "rig-c"], ["rig-d", "rig-e", "rig-f"]
    # A short lease: a killed worker's attempt is seen dead 4 s after the kill, not 30.
    with make_bench(tmp_path, live_nodes + dead_nodes, env={"SC_LEASE_TTL": "4"}) as bench:
        jobs = [bench.job(f"busy_{node}", node, "--sleep", "4") for node in live_nodes]
        # 60 s where they are killed; moved to a live node, a moment (--speed, by SC_NODE).
        quick = ",".join(f"{node}=0.01" for node in live_nodes)
        jobs += [bench.job(f"dies_{node}", node, "--sleep", "60", "--speed", quick)
                 for node in dead_nodes]
        jobs += [bench.job(f"queued_{node}", node) for node in dead_nodes]
        run = submit(jobs, output_dir="o", workdir=tmp_path, broker_url=bench.server.url)
        state = State()  # what Flower keeps of the task events, fed the same way
        app = make_app(bench.server.url)
        with app.connection() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": state.event})
            listener = threading.Thread(target=lambda: receiver.capture(limit=None,
                                                                        timeout=None),
                                        daemon=True)
            listener.start()
            try:
                wait_for(lambda: sum(job.state is JobState.RUNNING
                                     for job in run.status().jobs) == 6, 60,
                         "one job to run on every node")
                dead_tasks = {job.job_id: job.task_id for job in run.status().jobs
                              if job.job_id.startswith("dies_")}
                for node in dead_nodes:
                    bench.cluster.kill_worker(node)
                final = run.wait(timeout=180, failover=2)
                # Ended, with the reason: requeued first (RETRY: its message could come
                # back), then moved (FAILURE: it will not).
                wait_for(lambda: all(state.tasks.get(task_id) is not None
                                     and state.tasks[task_id].state == "FAILURE"
                                     and "died with its worker" in str(
                                         state.tasks[task_id].exception)
                                     for task_id in dead_tasks.values()), 30,
                         "the dead attempts to end in Flower's view",
                         seen=lambda: str({t: getattr(state.tasks.get(t), "state", None)
                                           for t in dead_tasks.values()}))
            finally:
                receiver.should_stop = True
                listener.join(timeout=10)
        assert {job.state for job in final.jobs} == {JobState.SUCCEEDED}
        summary = run.summary()
        by_id = {job["job_id"]: job for job in summary["jobs"]}
        for node in dead_nodes:  # the killed attempt is kept, then the one that succeeded
            history = by_id[f"dies_{node}"]["attempt_history"]
            assert [entry["exit_code"] for entry in history] == [None, 0], history
            assert f"died with its worker {node}@" in history[0]["error"]
            assert history[0]["started_at"] and history[0]["host"].startswith(f"{node}@")
        attempts = sum(len(job["attempt_history"]) for job in summary["jobs"])
        joblog = (tmp_path / "o" / "joblog").read_text().splitlines()
        assert len(joblog) == 1 + attempts == 1 + len(jobs) + 3
        # Six moved jobs over three live nodes, each running one: two each, not six on rig-a.
        moved_to = [move["to"] for move in summary["moves"] for _ in move["jobs"]]
        assert sorted(moved_to) == sorted(live_nodes * 2), summary["moves"]
        # No message of a moved job is left to count as work on the nodes it left.
        broker = redis.Redis.from_url(bench.server.url)
        for node in dead_nodes:
            assert broker.llen(f"node.{node}") == 0
        assert not any(task_id.encode() in blob for blob in broker.hvals("unacked")
                       for task_id in dead_tasks.values())
