"""Backup copies of stragglers (``Scheduler.speculate``, ``worker_tasks.copies``), with real
workers and a real Redis.

Each run has one floating straggler: ``probe_job.py --durations`` makes its first execution
slow and the next one fast (or the other way round), whatever slot takes it. The slots'
speeds are learned first from one pinned job each, so the head knows what the job should
take. In every case the job ends with exactly one ``.done`` (or none, when it is cancelled or
fails), its output is the winner's, no hidden per-execution output is left, and its history
holds an entry for every execution.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from test_reliability import Bench, make_bench, waiter_of

from coordinator import JobState, Run, submit
from coordinator.local import LocalCluster
from coordinator.records import RunStatus
from tests.helpers import REPO, run_cli
from tests.waiting import wait_for
from worker_tasks.tracking import JobTracker

PAUSE_VARIABLE = "SC_FAULT_PAUSE_AFTER_CLAIM"


@pytest.fixture()
def bench(tmp_path: Path) -> Iterator[Bench]:
    with make_bench(tmp_path, ["rig-a", "rig-b"]) as made:
        learn_speeds(made)
        yield made


def learn_speeds(bench: Bench) -> None:
    """One pinned job per slot: both slots learn that the script takes about 0.3 s."""
    run = submit([bench.job(f"learn-{node}", node, "--sleep", 0.3) for node in
                  ("rig-a", "rig-b")], output_dir="learn", broker_url=bench.server.url)
    assert run.wait(timeout=60).all_succeeded


def straggler(bench: Bench, durations: str, *extra: Any, **fields: Any) -> Run:
    """A run of one floating job ``s`` whose executions take ``durations`` seconds each."""
    job = bench.job("s", "any", "--durations", durations, *extra, **fields)
    return submit([job], output_dir="o", broker_url=bench.server.url)


def record(bench: Bench, run: Run) -> dict[str, Any]:
    return JobTracker(redis.Redis.from_url(bench.server.url)).record(run.id, "s")


@contextmanager
def followed(run: Run, timeout: float = 90) -> Iterator[list[RunStatus]]:
    """The head follows ``run`` in a thread (``run.wait``), as ``submit --wait`` does; the
    list holds its final status once it returns."""
    result: list[RunStatus] = []
    thread = threading.Thread(target=lambda: result.append(run.wait(timeout=timeout)),
                              daemon=True)
    thread.start()
    try:
        yield result
    finally:
        thread.join(timeout + 10)
    assert result, "the head did not return"


def copy_state(bench: Bench, run: Run) -> str | None:
    return (record(bench, run).get("copy") or {}).get("state")


def output_of(bench: Bench) -> dict[str, Any]:
    return json.loads((bench.workdir / "o" / "s.json").read_text())


def leftovers(bench: Bench) -> list[str]:
    """Hidden per-execution outputs left in the output directory."""
    return sorted(path.name for path in (bench.workdir / "o").glob(".s.json.part-*"))


def dones(bench: Bench) -> list[str]:
    return sorted(path.name for path in (bench.workdir / "o").glob("*.done"))


def test_a_straggler_gets_a_copy_on_the_idle_slot_and_the_copy_wins(
        bench: Bench, caplog: pytest.LogCaptureFixture) -> None:
    run = straggler(bench, "60,0.3")
    with caplog.at_level(logging.WARNING, logger="coordinator"):
        status = run.wait(timeout=60)
    assert status.all_succeeded
    notices = [r.getMessage() for r in caplog.records if "backup copy:" in r.getMessage()]
    assert len(notices) == 1 and "a copy starts on idle rig-" in notices[0], notices
    found = record(bench, run)
    assert found["copy"]["state"] == "won"
    first_node = bench.ledger_of("s")[0][4]
    assert found["node"] == found["copy"]["node"] != first_node
    # The copy's output, in place once; the original was killed, its hidden output gone.
    assert output_of(bench)["execution"] == 2 and output_of(bench)["node"] == found["node"]
    assert dones(bench) == ["s.json.done"] and leftovers(bench) == []
    history = found["history"]
    assert [(entry["attempt"], bool(entry.get("superseded"))) for entry in history] == [
        (1, True), ("copy", False)], history
    assert history[0]["node"] == first_node and "backup copy on" in history[0]["error"]
    assert history[1]["exit_code"] == 0 and history[1]["copy"] is True
    acct = run_cli("acct", run.id, env={"SC_BROKER_URL": bench.server.url})
    rows = [line.split() for line in acct.stdout.splitlines()[1:]]
    assert [(row[1], row[2], row[-1]) for row in rows] == [
        ("1", first_node, "superseded"), ("copy", found["node"], "0")], acct.stdout


def test_the_original_wins_when_it_ends_first_and_the_copy_is_killed(bench: Bench) -> None:
    run = straggler(bench, "4,60")
    with followed(run) as result:
        wait_for(lambda: copy_state(bench, run) == "running", 30, "the copy to start")
    assert result[0].all_succeeded
    found = record(bench, run)
    assert found["copy"]["state"] == "superseded"
    assert output_of(bench)["execution"] == 1 and dones(bench) == ["s.json.done"]
    wait_for(lambda: leftovers(bench) == [], 10, "the killed copy's output to be removed")
    entries = [(entry["attempt"], entry.get("superseded", False)) for entry in found["history"]]
    assert sorted(map(str, entries)) == sorted(map(str, [("copy", True), (1, False)]))


@pytest.mark.parametrize("where", ["job", "run"])
def test_no_copy_for_a_job_that_says_speculate_false_or_a_run_without(
        bench: Bench, where: str) -> None:
    job = bench.job("s", "any", "--durations", "3,0.3",
                    **({"speculate": False} if where == "job" else {}))
    run = submit([job], output_dir="o", broker_url=bench.server.url,
                 **({"speculate": False} if where == "run" else {}))
    assert run.wait(timeout=60).all_succeeded
    assert "copy" not in record(bench, run) and output_of(bench)["execution"] == 1
    # Written straight to its output: no hidden path for a job that is never copied.
    assert "--output-file o/s.json" in (bench.workdir / "o" / "logs" / "s.log").read_text()


def test_both_copies_fail_then_the_retry_succeeds(bench: Bench) -> None:
    """The copy fails first (the job runs on), then the original (its retry then runs)."""
    run = straggler(bench, "4,0.3,0.3", "--fail-executions", 2, retries=1)
    with followed(run) as result:
        wait_for(lambda: copy_state(bench, run) == "failed", 30, "the copy to fail")
    assert result[0].all_succeeded
    found = record(bench, run)
    assert [(entry["attempt"], entry["exit_code"]) for entry in found["history"]] == [
        ("copy", 1), (1, 1), (2, 0)], found["history"]
    assert output_of(bench)["execution"] == 3 and dones(bench) == ["s.json.done"]
    assert leftovers(bench) == []


def test_the_copy_runs_on_when_the_original_fails_for_good(bench: Bench) -> None:
    run = straggler(bench, "4,6", "--fail-executions", 1)
    with followed(run) as result:
        wait_for(lambda: copy_state(bench, run) == "took over", 30,
                 "the copy to take the job over")
    assert result[0].all_succeeded
    found = record(bench, run)
    assert [(entry["attempt"], entry["exit_code"]) for entry in found["history"]] == [
        (1, 1), ("copy", 0)], found["history"]
    assert output_of(bench)["execution"] == 2 and dones(bench) == ["s.json.done"]


def test_the_winner_killed_between_its_claim_and_its_output_runs_again(
        tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a", "rig-b"], env={PAUSE_VARIABLE: "60"}) as bench:
        learn_speeds(bench)
        run = straggler(bench, "60,0.3,0.3")
        with followed(run, timeout=120) as result:
            wait_for(lambda: copy_state(bench, run) == "won", 30, "the copy to claim the job")
            winner = record(bench, run)["node"]
            assert record(bench, run)["state"] == JobState.FINISHING
            bench.cluster.kill_worker(winner)  # claimed, its output not yet in place
            assert dones(bench) == [] and not (tmp_path / "o" / "s.json").exists()
            bench.cluster.extra_env.pop(PAUSE_VARIABLE)
            bench.cluster.start_worker(winner)
        assert result[0].all_succeeded
        assert dones(bench) == ["s.json.done"] and output_of(bench)["execution"] == 3
        assert output_of(bench)["node"] == winner


def test_the_losers_node_dies_and_the_copy_still_wins(bench: Bench) -> None:
    run = straggler(bench, "60,3")
    with followed(run) as result:
        wait_for(lambda: copy_state(bench, run) == "running", 30, "the copy to start")
        loser = bench.ledger_of("s")[0][4]
        bench.cluster.kill_worker(loser)
    assert result[0].all_succeeded
    found = record(bench, run)
    assert found["copy"]["state"] == "won" and found["node"] != loser
    assert found["history"][0]["node"] == loser and found["history"][0]["superseded"]
    assert output_of(bench)["execution"] == 2 and dones(bench) == ["s.json.done"]


def test_a_cancel_during_a_copy_kills_both_and_leaves_no_done(bench: Bench) -> None:
    run = straggler(bench, "60,60")
    with followed(run, timeout=60) as result:
        wait_for(lambda: copy_state(bench, run) == "running", 30, "the copy to start")
        run.cancel()
    assert result[0].outcome == "cancelled"
    found = record(bench, run)
    assert found["state"] == JobState.CANCELLED and found["copy"]["state"] == "superseded"
    assert "cancelled" in found["history"][-1]["error"]
    wait_for(lambda: len([e for e in bench.ledger_of("s") if e[0] == "start"]) == 2 and
             leftovers(bench) == [], 10, "both executions killed, their outputs removed")
    assert dones(bench) == []


def test_redis_restarted_mid_copy_and_the_copy_still_wins(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a", "rig-b"], persistent=True) as bench:
        learn_speeds(bench)
        run = straggler(bench, "60,4")
        with followed(run, timeout=120) as result:
            wait_for(lambda: copy_state(bench, run) == "running", 30, "the copy to start")
            bench.server.kill()
            bench.server.start()  # same port, same append-only file
        assert result[0].all_succeeded
        found = record(bench, run)
        assert found["copy"]["state"] == "won" and output_of(bench)["execution"] == 2
        assert dones(bench) == ["s.json.done"]


def test_the_head_killed_mid_tail_and_started_again_never_copies_twice(bench: Bench) -> None:
    run = straggler(bench, "8,60")
    with waiter_of(bench, run.id, 60) as (waiter, _, _):
        wait_for(lambda: copy_state(bench, run) == "running", 30, "the copy to start")
        copied = record(bench, run)["copy"]["task_id"]
        waiter.kill()
    with waiter_of(bench, run.id, 60) as (again, out, err):
        assert again.wait(timeout=60) == 0, out.read_text() + err.read_text()
    found = record(bench, run)
    assert found["copy"]["task_id"] == copied and found["copy"]["state"] == "superseded"
    assert output_of(bench)["execution"] == 1 and dones(bench) == ["s.json.done"]
    assert len([entry for entry in bench.ledger_of("s") if entry[0] == "start"]) == 2


def test_on_a_signed_cluster_the_copy_is_signed_by_the_head_and_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers run only what the head signed: the copy too, published with its key."""
    (tmp_path / "ledger").mkdir()
    with LocalCluster(["rig-a", "rig-b"], scripts_dir=REPO, workdir=tmp_path,
                      log_dir=tmp_path / "worker-logs", signed=True) as cluster:
        for name, value in cluster.head_env().items():
            monkeypatch.setenv(name, value)
        bench = Bench(cluster, SimpleNamespace(url=cluster.broker_url), tmp_path / "ledger",
                      tmp_path)  # type: ignore[arg-type]
        learn_speeds(bench)
        run = straggler(bench, "60,0.3")
        assert run.wait(timeout=60).all_succeeded
        assert record(bench, run)["copy"]["state"] == "won"
        assert output_of(bench)["execution"] == 2 and dones(bench) == ["s.json.done"]
    logs = "".join(path.read_text() for path in (tmp_path / "worker-logs").glob("*.log"))
    assert "refused" not in logs


def test_a_hand_made_copy_message_runs_nothing(bench: Bench) -> None:
    """A message that says it is a copy, sent straight into the idle slot's queue, is not the
    job's live copy (the record names none): it is dropped without running."""
    from dataclasses import replace

    from test_reliability import send_raw

    from coordinator.submission import spec_from_record

    run = straggler(bench, "4,0.3", speculate=False)
    wait_for(lambda: record(bench, run).get("state") == "running", 30, "the job to start")
    found = record(bench, run)
    idle = next(node for node in ("rig-a", "rig-b") if node != found["node"])
    forged = replace(spec_from_record(run.id, {**found, "node": idle, "job_id": "s"}),
                     copy=True)
    send_raw(bench.server, forged.to_message(), queue=f"node.{idle}", task_id=f"{run.id}.s.9")
    log = bench.workdir / "worker-logs" / f"worker-{idle}.log"
    wait_for(lambda: f"{run.id}.s.9): superseded by message" in log.read_text(), 30,
             "the forged copy to be dropped", seen=lambda: log.read_text()[-1500:])
    assert run.wait(timeout=60).all_succeeded
    assert [entry[0] for entry in bench.ledger_of("s")] == ["start", "end"]
    assert output_of(bench)["execution"] == 1 and "copy" not in record(bench, run)
