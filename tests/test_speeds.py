"""Slot speeds learned from the attempts (``worker_tasks.speeds``), with real workers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import run_cli
from test_reliability import Bench, make_bench

from coordinator import submit
from worker_tasks.speeds import FORGET_AFTER_S, SlotSpeeds, estimates, speeds_key


@pytest.fixture()
def bench(tmp_path: Path) -> Iterator[Bench]:
    with make_bench(tmp_path, ["rig-a", "rig-b"]) as made:
        yield made


def test_each_slot_learns_its_speed_per_unit_of_work_and_keeps_it(bench: Bench) -> None:
    """rig-b runs the script 4 times slower; a job twice the cost takes twice as long. The
    estimates say so, in status, cluster-wide and as metrics, and outlive the run."""
    speed = ["--speed", "rig-a=1,rig-b=4"]
    jobs = [bench.job(f"j{index}", node, "--sleep", 0.3 * cost, *speed, cost=cost)
            for index, (node, cost) in enumerate([("rig-a", 1), ("rig-b", 1), ("rig-a", 2),
                                                  ("rig-b", 2), ("rig-a", 1), ("rig-b", 1)])]
    run = submit(jobs, output_dir="o", broker_url=bench.server.url)
    assert run.wait(timeout=90).all_succeeded
    learned = run.speeds()["tests/probe_job.py"]
    assert set(learned) == {"rig-a", "rig-b"}
    assert learned["rig-a"].speed == 1.0 and learned["rig-a"].samples == 3
    # About a quarter; each job's start-up and bookkeeping (0.1 to 0.3 s on a loaded 2-core
    # machine) count at both speeds and pull it towards 1.
    assert 0.2 <= learned["rig-b"].speed <= 0.5, learned
    assert 0.3 <= learned["rig-a"].seconds_per_unit < 0.8, learned
    env = {"SC_BROKER_URL": bench.server.url}
    status = run_cli("status", run.id, env=env).stdout
    assert "speeds of tests/probe_job.py: rig-a 1.00 (" in status and ", rig-b 0." in status
    metrics = run_cli("metrics", "--textfile", str(bench.workdir / "m.prom"), env=env)
    assert metrics.returncode == 0, metrics.stderr
    text = (bench.workdir / "m.prom").read_text()
    assert 'sc_slot_speed{script="tests/probe_job.py",slot="rig-a"} 1' in text
    # The next run of the script starts from them, and adds to them.
    again = submit([bench.job("more", "rig-b", "--sleep", 0.3, *speed)], output_dir="o2",
                   broker_url=bench.server.url)
    assert again.wait(timeout=60).all_succeeded
    assert again.speeds()["tests/probe_job.py"]["rig-b"].samples == 4


def test_an_estimate_not_updated_for_a_week_is_forgotten(bench: Bench) -> None:
    client = redis.Redis.from_url(bench.server.url)
    speeds = SlotSpeeds(client)
    assert speeds.after_success("s.py", "rig-a", 2.0, 1.0) == 2.0
    assert speeds.after_success("s.py", "rig-a", 4.0, 2.0) == 2.0  # same per unit
    assert speeds.after_success("s.py", "rig-a", 3.0, 1.0) == pytest.approx(2.3)
    stale = json.dumps({"spu": 1.0, "n": 9, "at": time.time() - FORGET_AFTER_S - 1})
    client.hset(speeds_key("s.py"), "rig-old", stale)
    assert set(speeds.of("s.py")) == {"rig-a"}
    # A forgotten slot starts again from its next attempt, not from the old average.
    assert speeds.after_success("s.py", "rig-old", 5.0, 1.0) == 5.0
    assert speeds.of("s.py")["rig-old"].samples == 1
    assert speeds.scripts() == ["s.py"]


def test_speeds_are_relative_to_the_fastest_slot() -> None:
    now = time.time()
    raw = {b"a": json.dumps({"spu": 2.0, "n": 3, "at": now}).encode(),
           b"b": json.dumps({"spu": 8.0, "n": 1, "at": now}).encode()}
    found = estimates(raw, now)
    assert (found["a"].speed, found["b"].speed) == (1.0, 0.25)
    assert estimates({}, now) == {}


def test_the_tail_goes_where_it_finishes_first_and_a_slow_slot_stays_idle(
        bench: Bench, caplog: pytest.LogCaptureFixture) -> None:
    """rig-b runs the script 12 times slower (its estimate carried over from an earlier run).
    Once few floating jobs are left, the head that follows the run gives each to the slot
    that finishes it first: all to rig-a, and rig-b takes none of them. (At 6 times, a loaded
    machine's 0.3 s of start-up per job on both slots made one of the four finish first on
    rig-b, rightly.)"""
    speed = ["--sleep", 0.4, "--speed", "rig-a=1,rig-b=12"]
    # Pinned, so that each slot runs the script at least once however busy the machine.
    warm_up = submit([bench.job(f"w{index}", node, *speed)
                      for index, node in enumerate(["rig-a", "rig-a", "rig-b"])],
                     output_dir="w", broker_url=bench.server.url)
    assert warm_up.wait(timeout=90).all_succeeded
    learned = warm_up.speeds()["tests/probe_job.py"]
    assert set(learned) == {"rig-a", "rig-b"} and learned["rig-b"].speed < 0.4, learned
    run = submit([bench.job(f"t{index}", "any", *speed) for index in range(10)],
                 output_dir="t", broker_url=bench.server.url)
    with caplog.at_level("WARNING", logger="coordinator"):
        status = run.wait(timeout=120)
    assert status.all_succeeded
    placed = [record.getMessage() for record in caplog.records
              if record.getMessage().startswith("tail: placed the last ")]
    assert len(placed) == 1 and placed[0].endswith("where each finishes first: rig-a (4)"), \
        placed
    # rig-b took jobs while the queue was long (first free), none of the last four.
    last_four = [job for job in status.jobs][-4:]
    assert {job.node for job in last_four} == {"rig-a"}, [(j.job_id, j.node) for j in last_four]
    assert sum(job.node == "rig-b" for job in status.jobs) <= 2
