"""Jobs go where there is capacity: floating jobs (node "any") and --balance, against real
workers and Redis; every job runs exactly once by the probe's own ledger."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from coordinator import JobState, Run, reconcile, submit
from coordinator.errors import InvalidJobsError
from coordinator.options import SubmitOptions
from coordinator.submission import prepare
from tests.helpers import run_cli, write_jobs
from tests.test_reliability import VISIBILITY_S, Bench, make_bench
from tests.waiting import wait_for

SPEEDS = "rig-fa=1,rig-fb=1,rig-sl=4"


def floating(bench: Bench, job_id: str, *extra: object, **fields: object) -> dict[str, object]:
    return bench.job(job_id, "any", "--speed", SPEEDS, *extra, **fields)


def ran_on(bench: Bench, job_id: str) -> list[str]:
    """The nodes each execution of a job started on (the probe's ledger)."""
    return [entry[4] for entry in bench.ledger_of(job_id) if entry[0] == "start"]


def test_floating_jobs_go_to_free_nodes_and_fast_nodes_run_more(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-fa", "rig-fb", "rig-sl"]) as bench:
        jobs = [floating(bench, f"f{index:02d}", "--sleep", "0.4") for index in range(18)]
        run = submit(jobs, output_dir="o", workdir=tmp_path, broker_url=bench.server.url)
        status = run.wait(timeout=120)
        assert status.all_succeeded
        for index in range(18):
            assert bench.successes(f"f{index:02d}") == 1  # each ran exactly once
        where = Counter(node for index in range(18) for node in ran_on(bench, f"f{index:02d}"))
        # A slot four times slower takes about a quarter of a fast one's share.
        assert where["rig-sl"] < where["rig-fa"] and where["rig-sl"] < where["rig-fb"], where
        assert sum(where.values()) == 18
        assert bench.violations() == []
        # The record, the summary and the environment say where each job ran.
        records = {job.job_id: job for job in status.jobs}
        for index in range(18):
            job_id = f"f{index:02d}"
            assert records[job_id].node == ran_on(bench, job_id)[0]
            assert records[job_id].host.startswith(records[job_id].node + "@")
        summary = run.summary(workdir=tmp_path)
        assert {job["job_id"]: job["node"] for job in summary["jobs"]} == {
            job_id: job.node for job_id, job in records.items()}
        joblog = (tmp_path / "o" / "joblog").read_text().splitlines()[1:]
        assert {line.split("\t")[1].split("@")[0] for line in joblog} == set(where)


def test_a_pinned_job_never_leaves_its_node_in_a_balanced_run(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-fa", "rig-sl"]) as bench:
        jobs = [bench.job(f"p{index}", "rig-sl", "--sleep", "0.2", pin=True)
                for index in range(3)]
        jobs += [bench.job(f"b{index}", "rig-sl", "--sleep", "0.2") for index in range(6)]
        path = write_jobs(tmp_path / "jobs.json", jobs)
        plan = prepare(path, SubmitOptions(output_dir="o", balance=True))
        assert {spec.job_id: spec.node for spec in plan.specs} == {
            **{f"p{index}": "rig-sl" for index in range(3)},
            **{f"b{index}": "any" for index in range(6)}}
        dry = run_cli("submit", "--jobs-file", str(path), "--output-dir", "o", "--balance",
                      "--dry-run", cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert "node any (queue node.any): 6 jobs, each floats to the first free node" in \
            dry.stdout
        result = run_cli("submit", "--jobs-file", str(path), "--output-dir", "o", "--balance",
                         "--wait", "--workdir", str(tmp_path), "--broker", bench.server.url,
                         cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        for index in range(3):
            assert ran_on(bench, f"p{index}") == ["rig-sl"]
        assert {node for index in range(6) for node in ran_on(bench, f"b{index}")} <= {
            "rig-fa", "rig-sl"}
        assert sum(bench.successes(f"b{index}") for index in range(6)) == 6


def test_a_worker_killed_mid_job_loses_no_floating_job_and_runs_none_twice(
        tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-fa", "rig-fb"]) as bench:
        jobs = [floating(bench, f"k{index}", "--sleep", "1.5") for index in range(8)]
        run = submit(jobs, output_dir="o", workdir=tmp_path, broker_url=bench.server.url)
        wait_for(lambda: any(job.state is JobState.RUNNING and job.node == "rig-fb"
                             for job in run.status().jobs), 60, "a job running on rig-fb")
        victim = next(job for job in run.status().jobs
                      if job.state is JobState.RUNNING and job.node == "rig-fb")
        bench.cluster.kill_worker("rig-fb")  # SIGKILL, the job's script with it
        status = run.wait(timeout=120 + VISIBILITY_S * 3)
        assert status.all_succeeded
        assert sum(bench.successes(f"k{index}") for index in range(8)) == 8
        # The killed attempt ran again elsewhere, once; no job succeeded twice.
        assert ran_on(bench, victim.job_id)[-1] == "rig-fa"
        assert all(bench.successes(f"k{index}") == 1 for index in range(8))
        assert bench.violations() == []


def test_a_tail_job_placed_on_a_node_that_dies_goes_back_to_the_shared_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tail placed a job on a node; that node's worker is then SIGKILLed: the following
    head floats that job again, and a live node runs it (no --failover, no backup copies)."""
    # The job that was running there comes back once its worker is unseen this long.
    monkeypatch.setattr(reconcile, "RETURN_AFTER_S", 15.0)
    with make_bench(tmp_path, ["rig-fa", "rig-fb", "rig-fc"], env={"SC_LEASE_TTL": "4"}) \
            as bench:
        taught = [floating(bench, f"t{index}", "--sleep", "0.5") for index in range(6)]
        assert submit(taught, output_dir="o", workdir=tmp_path,
                      broker_url=bench.server.url).wait(timeout=60).all_succeeded
        jobs = [floating(bench, f"p{index}", "--sleep", "3") for index in range(6)]
        run = submit(jobs, output_dir="o", workdir=tmp_path, broker_url=bench.server.url,
                     speculate=False)
        notices: list[str] = []
        waiting = threading.Thread(target=lambda: notices.append(
            run.wait(timeout=120, notice=notices.append).line()))
        waiting.start()
        wait_for(lambda: any(line.startswith("tail: placed") for line in notices), 60,
                 "the tail to be placed", seen=lambda: notices)
        placed: dict[str, list[str]] = {}
        for job in run.status().jobs:
            if job.state is JobState.QUEUED and job.node:
                placed.setdefault(job.node, []).append(job.job_id)
        # The node that dies: one the tail gave one job (which nodes get one depends on the
        # speeds the first run taught, which a loaded machine skews).
        victim = next((node for node, ids in sorted(placed.items()) if len(ids) == 1), None)
        assert victim is not None, (notices, run.status().jobs)
        stranded = placed[victim]
        bench.cluster.kill_worker(victim)
        waiting.join(timeout=150)
        assert notices[-1] == "6/6 final: 6 succeeded", notices
        assert f"tail: no worker serves {victim} now; 1 floating jobs placed there go back to " \
               f"the shared queue: {stranded[0]}" in notices
        live = [node for node in ("rig-fa", "rig-fb", "rig-fc") if node != victim]
        assert ran_on(bench, stranded[0]) in ([live[0]], [live[1]])
        assert all(bench.successes(f"p{index}") == 1 for index in range(6))
        assert bench.violations() == []


def test_a_worker_frozen_past_its_lease_wakes_and_no_second_delivery_runs_beside_it(
        tmp_path: Path) -> None:
    """SIGSTOP a worker mid-job (a paused VM, say) for longer than its lease: the head
    requeues the job's record, but a worker unseen for less than ``RETURN_AFTER_S`` keeps
    its message; woken, it finishes the job, which runs once."""
    with make_bench(tmp_path, ["rig-fa", "rig-fb"],
                    env={"SC_VISIBILITY_TIMEOUT": "43200", "SC_LEASE_TTL": "4"}) as bench:
        run = submit([floating(bench, "frozen", "--sleep", "2")], output_dir="o",
                     workdir=tmp_path, broker_url=bench.server.url)
        wait_for(lambda: len(bench.ledger_of("frozen")) == 1, 60, "the job to start")
        node = ran_on(bench, "frozen")[0]
        worker = bench.cluster.workers[node].pid
        notices: list[str] = []
        os.killpg(worker, signal.SIGSTOP)
        try:
            waiting = threading.Thread(target=lambda: notices.append(
                run.wait(timeout=120, notice=notices.append).line()))
            waiting.start()
            wait_for(lambda: any(line.startswith("frozen: requeued") for line in notices), 60,
                     "the head to requeue the frozen worker's job", seen=lambda: notices)
        finally:
            os.killpg(worker, signal.SIGCONT)
        waiting.join(timeout=150)
        assert notices[-1] == "1/1 final: 1 succeeded", notices
        assert not any("is back in its queue" in line for line in notices), notices
        assert ran_on(bench, "frozen") == [node] and bench.successes("frozen") == 1


def frozen_until_run_again(bench: Bench, run: Run, job_id: str
                           ) -> tuple[str, threading.Thread, list[str]]:
    """SIGSTOP the worker running ``job_id`` (a paused VM) until the head, following ``run``,
    has given its message back and another node started the job; then SIGCONT it. Returns
    the frozen node, the thread that follows the run and the notices it printed."""
    wait_for(lambda: len(bench.ledger_of(job_id)) == 1, 60, "the job to start")
    node = ran_on(bench, job_id)[0]
    worker = bench.cluster.workers[node].pid
    notices: list[str] = []
    waiting = threading.Thread(target=lambda: notices.append(
        run.wait(timeout=150, notice=notices.append).line()))
    os.killpg(worker, signal.SIGSTOP)
    try:
        waiting.start()
        wait_for(lambda: len(ran_on(bench, job_id)) == 2, 90,
                 "the job to run again on the other node", seen=lambda: notices)
    finally:
        os.killpg(worker, signal.SIGCONT)
    return node, waiting, notices


def test_a_worker_frozen_past_the_grace_wakes_and_stops_its_overtaken_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP a worker mid-job for longer than ``RETURN_AFTER_S``: its job's message goes
    back and another node runs the job. The frozen worker's script ran on meanwhile (a
    runner has a process group of its own); woken, the worker kills it at its next look,
    rather than letting two executions of one job write on side by side for the rest of
    its hour."""
    monkeypatch.setattr(reconcile, "RETURN_AFTER_S", 2.0)
    with make_bench(tmp_path, ["rig-fa", "rig-fb"], env={"SC_LEASE_TTL": "4"}) as bench:
        run = submit([floating(bench, "thawed", "--durations", "120,1")], output_dir="o",
                     workdir=tmp_path, broker_url=bench.server.url, speculate=False)
        wait_for(lambda: len(bench.ledger_of("thawed")) == 1, 60, "the job to start")
        first = int(bench.ledger_of("thawed")[0][2])
        node, waiting, notices = frozen_until_run_again(bench, run, "thawed")
        # Woken, the worker looks within CANCEL_POLL_S and kills its attempt (of 120 s).
        wait_for(lambda: not os.path.exists(f"/proc/{first}"), 20,
                 "the overtaken attempt to be killed")
        waiting.join(timeout=150)
        assert notices[-1] == "1/1 final: 1 succeeded", notices
        assert ran_on(bench, "thawed")[1] != node and bench.successes("thawed") == 1
        log = tmp_path / "o" / "logs" / "thawed.log"
        wait_for(lambda: "overtaken: attempt 2 of the job started on" in log.read_text(), 30,
                 "the woken worker to log why it killed its attempt", seen=log.read_text)


def test_an_overtaken_attempt_that_succeeded_while_frozen_writes_no_marker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frozen worker's script succeeded while the worker was frozen, and the job runs
    again elsewhere: woken, the worker finds its attempt overtaken (the same message, a
    later attempt) and claims nothing; the later attempt's success is the job's."""
    monkeypatch.setattr(reconcile, "RETURN_AFTER_S", 2.0)
    with make_bench(tmp_path, ["rig-fa", "rig-fb"], env={"SC_LEASE_TTL": "4"}) as bench:
        run = submit([floating(bench, "early", "--durations", "1,6")], output_dir="o",
                     workdir=tmp_path, broker_url=bench.server.url, speculate=False)
        node, waiting, notices = frozen_until_run_again(bench, run, "early")
        waiting.join(timeout=150)
        assert notices[-1] == "1/1 final: 1 succeeded", notices
        other = ran_on(bench, "early")[1]
        assert other != node and bench.successes("early") == 2  # both scripts ran to the end
        marker = json.loads((tmp_path / "o" / "early.json.done").read_text())
        record = run.status().jobs[0]
        assert marker["host"].startswith(f"{other}@") and record.host == marker["host"]
        assert record.attempts == 2
        log = tmp_path / "o" / "logs" / "early.log"
        wait_for(lambda: "(superseded): no marker written" in log.read_text(), 30,
                 "the woken worker to log that it claimed nothing", seen=log.read_text)


def test_a_node_joining_mid_run_takes_floating_jobs_at_once(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-fa"]) as bench:
        jobs = [floating(bench, f"j{index}", "--sleep", "1") for index in range(10)]
        run = submit(jobs, output_dir="o", workdir=tmp_path, broker_url=bench.server.url)
        wait_for(lambda: run.status().done >= 1, 60, "the first job done")
        bench.cluster.start_worker("rig-fb")
        bench.cluster.wait_ready(["rig-fb"])
        assert run.wait(timeout=120).all_succeeded
        assert any(ran_on(bench, f"j{index}") == ["rig-fb"] for index in range(10))


def test_per_gpu_floating_jobs_get_their_slots_gpu(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-fa.gpu0", "rig-fa.gpu1"]) as bench:
        jobs = [floating(bench, f"g{index}", "--sleep", "0.3", "--lock-per-gpu", gpu_id=7)
                for index in range(6)]
        run = submit(jobs, output_dir="o", workdir=tmp_path, per_gpu=True,
                     broker_url=bench.server.url)
        assert run.wait(timeout=90).all_succeeded
        gpus = {bench.ledger_of(f"g{index}")[0][5] for index in range(6)}
        assert gpus == {"0", "1"}  # each slot's own device, never the job's gpu_id 7
        assert bench.violations() == []


def test_retry_of_a_failed_floating_job_floats_again_and_move_leaves_it(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-fa"]) as bench:
        run = submit([floating(bench, "once", "--fail-attempts", "1")], output_dir="o",
                     workdir=tmp_path, broker_url=bench.server.url)
        status = run.wait(timeout=60)
        assert status.jobs[0].state is JobState.FAILED
        assert run.move("rig-fa", ["rig-zz"]) == {}
        assert run.retry_failed() == 1
        record = run.status().jobs[0]
        assert (record.node, record.floating) == ("any", True)
        assert run.wait(timeout=60).all_succeeded


def test_any_is_no_node_name(tmp_path: Path) -> None:
    result = run_cli("worker", "--node", "any", "--workdir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "--node any: reserved for floating jobs (every worker takes them); name the node "
        "itself, e.g. --node rig-a")
    inventory = tmp_path / "cluster.toml"
    inventory.write_text('[defaults]\nworkdir = "/w"\n[nodes.any]\nhost = "127.0.0.2"\n')
    from coordinator.cluster.inventory import load_inventory

    with pytest.raises(InvalidJobsError, match=r"\[nodes.any\]: 'any' is reserved"):
        load_inventory(inventory)


def test_local_starts_the_named_nodes_for_a_file_of_floating_jobs(tmp_path: Path) -> None:
    jobs = [{"job_id": f"l{index}", "script": "examples/write_output.py",
             "args": ["--output-file", f"x/l{index}.json"], "node": "any"} for index in range(4)]
    path = write_jobs(tmp_path / "float.json", jobs)
    refused = run_cli("local", "--jobs-file", str(path), "--output-dir", "out", cwd=tmp_path)
    assert refused.returncode == 2
    assert "every job floats and no node is named" in refused.stderr
    result = run_cli("local", "--jobs-file", str(path), "--output-dir", "out", "--nodes",
                     "rig-la,rig-lb", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 workers (rig-la, rig-lb)" in result.stderr
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert {job["node"] for job in summary["jobs"]} <= {"rig-la", "rig-lb"}
    assert summary["succeeded"] == 4


def test_backup_copies_go_to_the_longest_straggler_first_onto_the_fastest_idle_slot() -> None:
    from coordinator.placement import RunningJob, backup_copies, copy_budget, time_left

    per_unit = {"rig-a": 1.0, "rig-b": 1.0, "rig-c": 2.0, "rig-d": 4.0}
    # Before its estimate: what is left; just past it: ending; well past it: as long again
    # as it has run.
    assert time_left(RunningJob("j", "rig-d", 1.0, 1.0), per_unit) == 3.0
    assert time_left(RunningJob("j", "rig-a", 1.0, 1.2), per_unit) == 0.0
    assert time_left(RunningJob("j", "rig-a", 1.0, 1.3), per_unit) == 1.3
    assert time_left(RunningJob("j", "rig-a", 1.0, 3.0), per_unit) == 3.0
    running = [RunningJob("short", "rig-c", 1.0, 0.5),   # 1.5 s left, 1 s elsewhere: no copy
               RunningJob("long", "rig-d", 1.0, 0.5),    # 3.5 s left
               RunningJob("over", "rig-a", 1.0, 3.2)]    # past its 1 s: 3.2 s left
    assert backup_copies(running, ["rig-c", "rig-b"], per_unit, budget=2) == {
        "long": "rig-b", "over": "rig-c"}
    assert backup_copies(running, ["rig-b"], per_unit, budget=2) == {"long": "rig-b"}
    assert backup_copies(running, ["rig-b"], per_unit, budget=0) == {}
    assert backup_copies(running, ["rig-q"], per_unit, budget=2) == {}  # no estimate there
    # The margin: 1.5x sooner, not merely sooner.
    assert backup_copies([RunningJob("j", "rig-c", 1.0, 0.6)], ["rig-a"], per_unit, 1) == {}
    assert backup_copies([RunningJob("j", "rig-c", 1.0, 0.4)], ["rig-a"], per_unit, 1) == {
        "j": "rig-a"}
    assert [copy_budget(slots, 0) for slots in (1, 4, 8, 9)] == [1, 1, 2, 2]
    assert copy_budget(8, 2) == 0 and copy_budget(4, 1) == 0


def test_a_fast_slot_whose_job_is_just_past_its_estimate_is_about_to_be_free() -> None:
    # The record of a job ends a little after its script does: a fast slot's job just past
    # its 0.5 s estimate is ending, not a straggler's, and the tail stays off the slow slot.
    from coordinator.placement import EarliestFinish, RunningJob, placed, time_left

    per_unit = {"rig-a": 0.5, "rig-d": 2.0}
    free_at = {"rig-a": time_left(RunningJob("now", "rig-a", 1.0, 0.52), per_unit),
               "rig-d": 0.0}
    tail = [(f"t{index}", "any") for index in range(3)]
    assert placed(EarliestFinish(free_at, per_unit), tail) == dict.fromkeys(
        ["t0", "t1", "t2"], "rig-a")
