"""The soak: 1,000+ jobs over 4 nodes, with failures, worker kills and a broker crash.

About 10% of the jobs fail their first attempt (``retries: 2``); two workers are
SIGKILLed mid-job; Redis is SIGKILLed and restarted (append-only persistence)
in the middle. ``coordinator wait`` must return by itself, with every job
succeeded exactly once (by the probe script's own ledger), no two copies of a
job and no two jobs of a node ever at once, and no record left unfinished.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from coordinator import JobState, get_run, submit
from tests.test_reliability import make_bench, waiter_of
from tests.waiting import wait_for

NODES = ["rig-a", "rig-b", "rig-c", "rig-d"]
JOBS = 1000
# Jobs that fail their first attempt on purpose (seeded: the same ones every run).
FAILING = set(random.Random(2026).sample(range(JOBS), JOBS // 10))


def test_soak_1000_jobs_with_retries_worker_kills_and_a_broker_crash(tmp_path: Path) -> None:
    with make_bench(tmp_path, NODES, persistent=True) as bench:
        jobs = [bench.job(f"s{i:04d}", NODES[i % 4], *(["--fail-attempts", "1"]
                                                       if i in FAILING else []),
                          retries=2, retry_delay=0.05)
                for i in range(JOBS)]
        # Two long jobs in the middle of their nodes' queues: the workers die while they run.
        jobs.insert(300, bench.job("long_a", "rig-a", "--sleep", "4", retries=2))
        jobs.insert(600, bench.job("long_b", "rig-b", "--sleep", "4", retries=2))
        run = submit(jobs, output_dir="o", broker_url=bench.server.url)
        with waiter_of(bench, run.id, 300) as (waiter, out, err):
            for victim, node in (("long_a", "rig-a"), ("long_b", "rig-b")):
                wait_for(lambda victim=victim: len(bench.ledger_of(victim)) == 1, 300,
                         f"{victim} to start", every=0.05)
                bench.cluster.kill_worker(node)  # SIGKILL, mid-job
                bench.cluster.start_worker(node)
                bench.cluster.wait_ready([node])
            wait_for(lambda: sum(1 for path in bench.ledger.glob("*.ledger")) > JOBS // 2, 300,
                     "half the jobs to have run")
            bench.server.kill()  # the broker crashes mid-run ...
            assert sum(1 for path in bench.ledger.glob("*.ledger")) < len(jobs)
            time.sleep(1.0)
            bench.server.start()  # ... and comes back with its append-only file
            waiter.wait(timeout=600)
        assert waiter.returncode == 0, out.read_text()[-2000:] + err.read_text()[-2000:]
        assert f"{len(jobs)}/{len(jobs)} succeeded" in out.read_text()
        assert "reconnected to Redis after" in err.read_text()

        status = get_run(run.id, bench.server.url).status()
        assert {job.state for job in status.jobs} == {JobState.SUCCEEDED}
        assert bench.violations() == []
        for job in jobs:
            assert bench.successes(job["job_id"]) == 1, (job["job_id"],
                                                         bench.ledger_of(job["job_id"]))
        by_id = {job.job_id: job for job in status.jobs}
        assert all(by_id[f"s{i:04d}"].attempts == 2 for i in FAILING)
        assert by_id["long_a"].attempts >= 2 and by_id["long_b"].attempts >= 2
        summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
        assert summary["succeeded"] == len(jobs) and summary["counts"]["running"] == 0
