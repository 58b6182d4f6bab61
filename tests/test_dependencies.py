"""Jobs that wait for other jobs of their run (``"after"``), with real workers and Redis.

A held job's message waits in a hold list on the broker; the worker that ends its last
dependency releases it (or ends it, when a dependency failed), so these runs complete with
no head following them unless a test says otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import REPO, run_cli
from test_reliability import Bench, make_bench
from waiting import wait_for

from coordinator import JobState, submit
from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer
from coordinator.run import get_run
from coordinator.submission import spec_from_record
from worker_tasks.celery_app import make_app
from worker_tasks.dependencies import hold_queue
from worker_tasks.spec import RUN_JOB_TASK
from worker_tasks.tracking import job_key


@pytest.fixture()
def bench(tmp_path: Path) -> Iterator[Bench]:
    with make_bench(tmp_path, ["rig-a", "rig-b"]) as made:
        yield made


def states_of(run_id: str, url: str) -> dict[str, Any]:
    return {job.job_id: job for job in get_run(run_id, broker_url=url).status().jobs}


def wait_final(run_id: str, url: str, timeout: float = 60) -> dict[str, Any]:
    """Every job final, read from the records (nothing follows the run meanwhile)."""
    wait_for(lambda: all(job.state.is_final for job in states_of(run_id, url).values()),
             timeout, f"every job of run {run_id} to end")
    return states_of(run_id, url)


def test_a_job_runs_only_once_every_job_it_names_succeeded(bench: Bench) -> None:
    jobs = [bench.job("a", "rig-a", "--sleep", 1.5), bench.job("b", "rig-b", "--sleep", 0.2),
            bench.job("c", "rig-b", after=["a", "b"]), bench.job("d", "rig-a", after=["c"])]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url)
    held = states_of(run.id, bench.server.url)
    assert held["c"].state is JobState.HELD and held["d"].state is JobState.HELD
    # Nobody follows the run: the workers release c, then d.
    done = wait_final(run.id, bench.server.url)
    assert {job.state for job in done.values()} == {JobState.SUCCEEDED}
    assert done["c"].started_at >= max(done["a"].finished_at, done["b"].finished_at)
    assert done["d"].started_at >= done["c"].finished_at
    assert [len(bench.ledger_of(name)) for name in "abcd"] == [2, 2, 2, 2]  # start, end
    broker = redis.Redis.from_url(bench.server.url)
    assert not broker.exists(hold_queue(run.id, "c"), hold_queue(run.id, "d"))


def test_a_failed_dependency_ends_its_dependents_without_running_them(bench: Bench) -> None:
    jobs = [bench.job("f", "rig-a", "--fail-attempts", 9, retries=0),
            bench.job("g", "rig-b", after=["f"]), bench.job("h", "rig-a", after=["g"]),
            bench.job("free", "rig-b")]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url)
    done = wait_final(run.id, bench.server.url)
    assert done["f"].state is JobState.FAILED and done["free"].state is JobState.SUCCEEDED
    assert done["g"].state is JobState.CANCELLED and done["g"].error == "dependency f failed"
    assert done["h"].state is JobState.CANCELLED
    assert done["h"].error.startswith("dependency g was not run")
    assert bench.ledger_of("g") == bench.ledger_of("h") == []
    broker = redis.Redis.from_url(bench.server.url)
    assert not broker.exists(hold_queue(run.id, "g"), hold_queue(run.id, "h"))
    # wait says how it ended: a failed run.
    assert run_cli("wait", run.id, env={"SC_BROKER_URL": bench.server.url},
                   cwd=bench.workdir).returncode == 1


@pytest.mark.parametrize(("after", "expected"), [
    ({"b": ["nope"]}, "job 1 (job_id 'b'): field 'after': no job 'nope' in this file"),
    ({"a": ["a"]}, "job 0 (job_id 'a'): field 'after': the job waits for itself"),
    ({"a": ["c"], "b": ["a"], "c": ["b"]},
     "job 0 (job_id 'a'): field 'after': a cycle: a -> c -> b -> a (each waits for the "
     "next)"),
])
def test_cycles_and_unknown_ids_are_refused_and_nothing_is_published(
        tmp_path: Path, redis_server: RedisServer, after: dict[str, list[str]],
        expected: str) -> None:
    jobs = [{"job_id": name, "script": "tests/probe_job.py", "node": "rig-a",
             "args": ["--ledger", "l", "--output-file", f"o/{name}.json"],
             **({"after": after[name]} if name in after else {})} for name in "abc"]
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    # A database of its own: the suite's workers keep keys with TTLs in database 0, so a
    # count there can change by itself while the CLI runs.
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    client = redis.Redis.from_url(url)
    client.flushdb()
    result = run_cli("submit", "--jobs-file", str(path), env={"SC_BROKER_URL": url})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"coordinator: error: {path}: {expected}"]
    assert client.dbsize() == 0


def test_the_dry_run_shows_the_graph_in_levels(tmp_path: Path) -> None:
    jobs = [{"job_id": name, "script": "s.py", "node": "rig-a", **extra}
            for name, extra in [("a", {}), ("b", {}), ("c", {"after": ["a", "b"]}),
                                ("d", {"after": ["c"]}), ("e", {"after": ["a"]})]]
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    result = run_cli("submit", "--jobs-file", str(path), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert ("levels (a job starts once every job it names has succeeded):\n"
            "  level 0: a, b\n"
            "  level 1: c (after a, b), e (after a)\n"
            "  level 2: d (after c)") in result.stdout


def test_a_held_message_moved_early_by_hand_runs_nothing(bench: Bench) -> None:
    gate = bench.workdir / "gate"
    jobs = [bench.job("first", "rig-a", "--sleep", 60, "--until", gate),
            bench.job("second", "rig-b", after=["first"])]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url)
    broker = redis.Redis.from_url(bench.server.url)
    # An attacker (or a slip) moves the held message into its queue before its time.
    assert broker.rpoplpush(hold_queue(run.id, "second"), "node.rig-b") is not None
    log = bench.workdir / "worker-logs" / "worker-rig-b.log"
    wait_for(lambda: "delivered before it was released: dependency first has not "
             "succeeded; not run" in log.read_text(), 30, "the early message to be dropped")
    assert bench.ledger_of("second") == []
    assert states_of(run.id, bench.server.url)["second"].state is JobState.HELD
    gate.touch()
    # Its message is spent: the head that follows the run finds it lost and publishes it
    # again, once; it runs after its dependency, exactly once.
    status = run.wait(timeout=90)
    by_id = {job.job_id: job for job in status.jobs}
    assert by_id["second"].state is JobState.SUCCEEDED
    assert by_id["second"].started_at >= by_id["first"].finished_at
    assert len(bench.ledger_of("second")) == 2


def test_a_signed_cluster_releases_only_what_the_head_signed(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    with LocalCluster(["rig-s", "rig-t"], scripts_dir=REPO, workdir=tmp_path,
                      log_dir=tmp_path / "logs", signed=True) as cluster:
        for variable, value in cluster.head_env().items():
            monkeypatch.setenv(variable, value)
        gate = tmp_path / "gate"
        jobs = [{"job_id": name, "script": "tests/probe_job.py", "node": node,
                 "args": ["--ledger", str(ledger), "--output-file", f"o/{name}.json", *extra],
                 **({"after": [after]} if after else {})}
                for name, node, after, extra in [
                    ("one", "rig-s", None, ["--sleep", "60", "--until", str(gate)]),
                    ("two", "rig-t", "one", []), ("three", "rig-t", "two", [])]]
        run = submit(jobs, output_dir="o", broker_url=cluster.broker_url)
        # A forger with write access to Redis: "two" made queued, and a hand-made (unsigned)
        # copy of its message sent to its queue, while "one" still runs.
        client = redis.Redis.from_url(cluster.broker_url)
        client.hset(job_key(run.id, "two"), "state", json.dumps("queued"))
        task_id = json.loads(client.hget(job_key(run.id, "two"), "task_id"))
        forged = spec_from_record(run.id, {
            "spec": json.loads(client.hget(job_key(run.id, "two"), "spec")),
            "node": "rig-t", "job_id": "two"})
        app = make_app(cluster.broker_url)
        app.conf.result_backend = None
        app.send_task(RUN_JOB_TASK, args=[{**forged.to_message(), "task_id": task_id}],
                      queue="node.rig-t", task_id=task_id, serializer="json")
        log = tmp_path / "logs" / "worker-rig-t.log"
        wait_for(lambda: f"refused message {task_id}" in log.read_text(), 30,
                 "the forged message to be refused")
        assert not (ledger / "two.ledger").exists()
        gate.touch()
        done = wait_final(run.id, cluster.broker_url)
        assert {job.state for job in done.values()} == {JobState.SUCCEEDED}
        assert done["three"].started_at >= done["two"].finished_at >= done["one"].started_at
        # The held messages travelled signed: only the forged one was refused.
        refused = [line for line in log.read_text().splitlines() if "refused message" in line]
        assert len(refused) == 1 and task_id in refused[0], refused


def test_a_worker_killed_while_a_dependency_runs_still_releases_once(bench: Bench) -> None:
    gate = bench.workdir / "gate"
    jobs = [bench.job("base", "rig-a", "--sleep", 60, "--until", gate),
            bench.job("next", "rig-b", after=["base"])]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url)
    wait_for(lambda: len(bench.ledger_of("base")) == 1, 30, "base to start")
    bench.cluster.kill_worker("rig-a")  # SIGKILL, mid-job
    bench.cluster.start_worker("rig-a")
    gate.touch()
    done = wait_final(run.id, bench.server.url, timeout=90)
    assert done["base"].state is JobState.SUCCEEDED and done["next"].state is JobState.SUCCEEDED
    assert [entry[0] for entry in bench.ledger_of("next")] == ["start", "end"]
    assert done["next"].started_at >= done["base"].finished_at
    assert bench.violations() == []


# -- runs that wait for runs (--after, --after-any) --------------------------------------------


def test_a_run_after_another_starts_by_itself_once_that_one_succeeded(bench: Bench) -> None:
    gate = bench.workdir / "gate"
    first = submit([bench.job("s3", "rig-a", "--sleep", 60, "--until", gate)], output_dir="o",
                   broker_url=bench.server.url)
    second = submit([bench.job("s5", "rig-b"), bench.job("s5b", "rig-a", after=["s5"])],
                    output_dir="o", broker_url=bench.server.url, after=first)
    env = {"SC_BROKER_URL": bench.server.url}
    status = run_cli("status", second.id, env=env)
    assert f"waits for run {first.id} (afterok)" in status.stdout
    assert f"({'waits for run ' + first.id} (afterok))" in run_cli("runs", env=env).stdout
    assert {job.state for job in states_of(second.id, bench.server.url).values()} == \
        {JobState.HELD}
    third = submit([bench.job("s6", "rig-b")], output_dir="o", broker_url=bench.server.url,
                   after=[second.id])
    wait_for(lambda: len(bench.ledger_of("s3")) == 1, 30, "step 3 to start")
    assert bench.ledger_of("s5") == [] and bench.ledger_of("s6") == []
    gate.touch()  # nobody follows any of the three runs: the workers chain them
    done = wait_final(third.id, bench.server.url, timeout=90)
    assert done["s6"].state is JobState.SUCCEEDED
    middle = states_of(second.id, bench.server.url)
    assert middle["s5"].started_at >= states_of(first.id, bench.server.url)["s3"].finished_at
    assert done["s6"].started_at >= max(job.finished_at for job in middle.values())
    assert "waits for run" not in run_cli("status", second.id, env=env).stdout


def test_a_run_after_a_failed_run_ends_cancelled_and_wait_says_so(bench: Bench) -> None:
    gate = bench.workdir / "gate"
    failing = submit([bench.job("bad", "rig-a", "--sleep", 60, "--until", gate,
                                "--fail-attempts", 9)],
                     output_dir="o", broker_url=bench.server.url)
    held = submit([bench.job("never", "rig-b")], output_dir="o", broker_url=bench.server.url,
                  after=failing.id, workdir=bench.workdir)
    anyway = submit([bench.job("cleanup", "rig-b")], output_dir="o",
                    broker_url=bench.server.url, after=failing.id, after_any=True)
    gate.touch()
    env = {"SC_BROKER_URL": bench.server.url}
    ended = wait_final(held.id, bench.server.url)["never"]
    reason = f"run {failing.id} it waits for failed"
    assert ended.state is JobState.CANCELLED and ended.error == reason
    assert bench.ledger_of("never") == []
    assert run_cli("wait", held.id, env=env, cwd=bench.workdir).returncode == 1
    assert f"ended without starting: {reason}" in run_cli("status", held.id, env=env).stdout
    # afterany: it waited for the failed run to end, then ran.
    assert wait_final(anyway.id, bench.server.url)["cleanup"].state is JobState.SUCCEEDED


def test_after_a_run_that_cannot_satisfy_it_is_refused_and_nothing_is_published(
        bench: Bench, tmp_path: Path) -> None:
    failed = submit([bench.job("bad", "rig-a", "--fail-attempts", 9)], output_dir="o",
                    broker_url=bench.server.url)
    wait_final(failed.id, bench.server.url)
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([bench.job("j", "rig-b")]))
    env = {"SC_BROKER_URL": bench.server.url}
    client = redis.Redis.from_url(bench.server.url)
    runs_before = client.zcard("sc:runs")
    refused = run_cli("submit", "--jobs-file", str(path), "--after", failed.id, env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"coordinator: error: --after {failed.id}: that run "
                                      f"failed, so this one would never start (--after-any "
                                      f"waits for it to end, however)")
    unknown = run_cli("submit", "--jobs-file", str(path), "--after", "20200101-000000-abcdef",
                      env=env)
    assert unknown.returncode == 4, unknown.stderr
    assert "--after 20200101-000000-abcdef: no such run" in unknown.stderr
    lone = run_cli("submit", "--jobs-file", str(path), "--after-any", env=env)
    assert lone.returncode == 2 and "give the runs to wait for with --after RUN" in lone.stderr
    assert client.zcard("sc:runs") == runs_before
    # --after-any accepts the failed run: it has ended, so the run starts at once.
    anyway = run_cli("submit", "--jobs-file", str(path), "--after", failed.id, "--after-any",
                     "--wait", "--timeout", "60", env=env)
    assert anyway.returncode == 0, anyway.stderr


def test_a_release_left_undone_is_done_once_by_the_head_that_follows(bench: Bench) -> None:
    """The window a worker killed (or a broker restarted) between a dependency's success and
    its release leaves: the dependency succeeded, its dependent still held. Made here by
    hiding the dependents from the worker; the head's scheduler releases it, and releasing
    again (a second head, a redelivered message) moves nothing."""
    from worker_tasks.dependencies import DEPENDENTS_FIELD, Dependencies
    from worker_tasks.tracking import job_key

    gate = bench.workdir / "gate"
    run = submit([bench.job("dep", "rig-a", "--sleep", 60, "--until", gate),
                  bench.job("later", "rig-b", after=["dep"])],
                 output_dir="o", broker_url=bench.server.url)
    client = redis.Redis.from_url(bench.server.url)
    client.hdel(job_key(run.id, "dep"), DEPENDENTS_FIELD)
    gate.touch()
    wait_for(lambda: states_of(run.id, bench.server.url)["dep"].state is JobState.SUCCEEDED,
             30, "the dependency to succeed")
    assert states_of(run.id, bench.server.url)["later"].state is JobState.HELD
    status = run.wait(timeout=90)  # the scheduler settles held jobs while the run is quiet
    assert {job.job_id: job.state for job in status.jobs}["later"] is JobState.SUCCEEDED
    again = Dependencies(client, client)
    assert again.settle(run.id, ["later"]) == ([], [])
    assert not again.release_if_ready(run.id, "later")
    assert [entry[0] for entry in bench.ledger_of("later")] == ["start", "end"]
