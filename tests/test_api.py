"""The Python API's two steps: ``prepare(jobs, options) -> Plan``, ``publish(plan) -> Run``.

A real Redis (the suite's), no workers: these check what is recorded and published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator import SubmitOptions, get_run, prepare, publish, recover, submit
from coordinator.cli import build_parser
from coordinator.options import DEFAULTS
from coordinator.redis_server import RedisServer
from tests.helpers import echo_job, write_jobs
from worker_tasks.spec import DEFAULT_RETRY_DELAY_S


def test_command_line_flags_take_their_defaults_from_the_options_type() -> None:
    args = build_parser().parse_args(["submit", "--jobs-file", "j.json"])
    options = SubmitOptions.from_args(args, inventory=None)
    assert options == SubmitOptions(workdir=Path("."))
    assert DEFAULTS.retry_delay == DEFAULT_RETRY_DELAY_S
    local = build_parser().parse_args(["local", "--jobs-file", "j.json", "--retries", "3",
                                       "--per-gpu", "--output-dir", "o"])
    # local knows where its scripts are: planning checks them there (issue 32).
    assert SubmitOptions.from_args(local) == SubmitOptions(output_dir="o", retries=3,
                                                           per_gpu=True, scripts_dir=Path("."))


def test_a_prepared_plan_is_published_as_it_is(redis_server: RedisServer,
                                               tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.json", [echo_job("p1", "rig-api-a"),
                                                echo_job("p2", "rig-api-b")])
    options = SubmitOptions(output_dir="apiout", workdir=tmp_path, retries=2, retry_delay=0.5)
    plan = prepare(jobs, options)  # as docs/python-api.md shows it
    assert plan.jobs_file == str(jobs.resolve())
    assert [spec.args[1] for spec in plan.specs] == ["apiout/p1.json", "apiout/p2.json"]
    run = publish(plan, broker_url=redis_server.url)
    try:
        assert run.id == plan.run_id
        status = run.status()
        assert [(job.job_id, job.node, job.retries) for job in status.jobs] == [
            ("p1", "rig-api-a", 2), ("p2", "rig-api-b", 2)]
        info = run.info()
        assert info["workdir"] == str(tmp_path.resolve())
        assert info["jobs_file"] == str(jobs.resolve())
    finally:
        run.cancel()


def test_a_handle_from_get_run_knows_what_submit_returned(redis_server: RedisServer,
                                                           tmp_path: Path) -> None:
    jobs = [echo_job("g1", "rig-api-a", gpu_id=1), echo_job("g2", "rig-api-a", gpu_id=0),
            echo_job("g3", "rig-api-c")]
    run = submit(jobs, output_dir="gout", workdir=tmp_path, per_gpu=True,
                 broker_url=redis_server.url)
    try:
        again = get_run(run.id, redis_server.url)
        for handle in (run, again):
            info = handle.info()  # one read of the run's record, explicit (issue 29)
            assert info.planned == {"rig-api-a": 2, "rig-api-c": 1}
            assert info.slots == ["rig-api-a.gpu0", "rig-api-a.gpu1", "rig-api-c.gpu0"]
            assert info.recovered == 0
            assert info.pushed == []
    finally:
        run.cancel()


def test_recover_records_the_done_jobs_in_the_run(redis_server: RedisServer,
                                                  tmp_path: Path) -> None:
    jobs = [echo_job("r1", "rig-api-a", "rout"), echo_job("r2", "rig-api-a", "rout")]
    (tmp_path / "rout").mkdir()
    (tmp_path / "rout" / "r1.json.done").write_text(json.dumps({}))
    run = recover(jobs, output_dir="rout", workdir=tmp_path, broker_url=redis_server.url)
    try:
        assert get_run(run.id, redis_server.url).info().recovered == 1
        assert {job.job_id: job.state for job in run.status().jobs} == {"r1": "skipped",
                                                                       "r2": "queued"}
    finally:
        run.cancel()


def test_keyword_settings_must_be_options(redis_server: RedisServer) -> None:
    with pytest.raises(TypeError):
        submit([echo_job("k1", "rig-api-a")], output_directory="x",
               broker_url=redis_server.url)


def test_options_from_a_command_line_that_lacks_some_flags() -> None:
    import argparse

    assert SubmitOptions.from_args(argparse.Namespace(output_dir="o", retries=2)) == \
        SubmitOptions(output_dir="o", retries=2)
    assert SubmitOptions.from_args(argparse.Namespace(per_gpu=True), balance=True) == \
        SubmitOptions(per_gpu=True, balance=True)
    # A flag given as None (not on the command line) keeps the default.
    assert SubmitOptions.from_args(argparse.Namespace(workdir=None, retries=None)) == \
        SubmitOptions()


def test_options_from_a_command_line_load_its_inventory(tmp_path: Path) -> None:
    inventory = tmp_path / "cluster.toml"
    inventory.write_text('[defaults]\nscripts_dir = "/opt/pipeline"\nworkdir = "/data"\n'
                         '[nodes.rig-a]\nhost = "127.0.0.2"\ngpus = 2\n')
    args = build_parser().parse_args(["submit", "--jobs-file", "j.json", "--inventory",
                                      str(inventory)])
    options = SubmitOptions.from_args(args)
    assert options.inventory is not None and list(options.inventory.nodes) == ["rig-a"]
    assert options.inventory.nodes["rig-a"].config.gpus == 2
    assert SubmitOptions.from_args(args, inventory=None).inventory is None  # overrides win
