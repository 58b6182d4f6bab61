"""The head node refuses what the worker would refuse, from the same rules, before anything
is published; and a message the worker does refuse fails its job, never leaves it lost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import celeryconfig
from coordinator.errors import InvalidJobsError
from coordinator.options import SubmitOptions
from coordinator.submission import prepare, record_run, task_id_for
from tests.helpers import run_cli, write_jobs
from tests.test_reliability import make_bench, send_raw
from tests.waiting import wait_for
from worker_tasks.spec import (
    MAX_ARGS_CHARS,
    UNASSIGNED_NODE,
    InvalidMessage,
    JobSpec,
    queue_for,
)
from worker_tasks.tracking import JobState, JobTracker

BASE = {"job_id": "j", "script": "examples/write_output.py",
        "args": ["--output-file", "x/j.json"], "node": "rig-a", "gpu_id": 0}


def refusal(tmp_path: Path, jobs: Any, *extra: str) -> str:
    """``submit --dry-run``'s one-line refusal (exit 2) of a jobs file."""
    path = tmp_path / "jobs.json"
    path.write_text(jobs if isinstance(jobs, str) else json.dumps(jobs))
    result = run_cli("submit", "--jobs-file", str(path), "--dry-run", *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_the_unassigned_queue_is_the_default_queue() -> None:
    assert celeryconfig.task_default_queue == queue_for(UNASSIGNED_NODE)


REFUSALS = [
    ({"node": "unassigned"}, "field 'node': 'unassigned' is reserved"),
    ({"node": "rig-a.gpu1"}, "field 'node': 'rig-a.gpu1' ends like a GPU slot (.gpuN)"),
    ({"args": ["--output-file"]}, "'--output-file' is the last argument: it has no value"),
    ({"args": ["--output-file", ""]}, "--output-file '' names no file"),
    ({"args": ["--output-file="]}, "--output-file '' names no file"),
    ({"args": ["--output-file", "x/"]}, "--output-file 'x/' names no file"),
    ({"args": ["--output-file", "."]}, "--output-file '.' names no file"),
    ({"timeout": 1e-300}, "field 'timeout': 1e-300 is shorter than 0.01 s"),
    ({"script": "-x.py"}, "has a part starting with '-'"),
    ({"script": "a\nb.py"}, "contains a control character"),
    ({"script": "s" * 5000 + ".py"}, "characters long (at most 1024)"),
    ({"args": ["--output-file", "x/j.json", "y" * (MAX_ARGS_CHARS + 1)]},
     f"args are longer than {MAX_ARGS_CHARS} characters in all (the workers would refuse"),
]


@pytest.mark.parametrize(("change", "expected"), REFUSALS)
def test_planning_refuses_what_can_only_fail_later(change: dict[str, Any],
                                                   expected: str) -> None:
    """In-process (mutation testing reaches it): the same refusals as the CLI's below."""
    with pytest.raises(InvalidJobsError) as caught:
        prepare([{**BASE, **change}], SubmitOptions(output_dir="o"))
    assert str(caught.value).startswith("jobs: job 0 (job_id 'j'): ")
    assert expected in str(caught.value), str(caught.value)


@pytest.mark.parametrize(("change", "expected"), REFUSALS)
def test_the_head_refuses_in_one_line_what_can_only_fail_later(
        tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    line = refusal(tmp_path, [{**BASE, **change}])
    assert "job 0 (job_id 'j')" in line and expected in line, line


def test_the_worker_refuses_the_same_names(tmp_path: Path) -> None:
    plan = prepare([BASE], SubmitOptions(output_dir="o"))
    message = plan.specs[0].to_message()
    for node in ("unassigned", "rig-a.gpu1"):
        with pytest.raises(InvalidMessage, match="reserved|GPU slot"):
            JobSpec.from_message({**message, "node": node})
    with pytest.raises(InvalidMessage, match="starting with '-'"):
        JobSpec.from_message({**message, "script": "-x.py"})


def test_a_legacy_history_path_must_stay_in_the_workdir(tmp_path: Path) -> None:
    legacy = {"job_id": "l", "seeds": [1, 2], "prng_type": "java_lcg", "mod": 1000,
              "node": "rig-a", "train_history": "/etc/passwd"}
    assert "field 'train_history': train_history '/etc/passwd' is not a relative path" in \
        refusal(tmp_path, [legacy])
    assert "climbs out of its directory" in refusal(tmp_path, [{**legacy,
                                                                "train_history": "../../x"}])


def test_a_key_twice_in_one_job_is_ambiguous(tmp_path: Path) -> None:
    text = ('[{"job_id": "j", "script": "examples/write_output.py", "args": [], '
            '"node": "rig-a", "node": "rig-b"}]')
    assert "key 'node' appears twice in one object" in refusal(tmp_path, text)


# Messages as the head would plan them, with every field drawn wide: each the worker would
# refuse must be refused by the head first (the same generator feeds both sides).
job_entries = st.fixed_dictionaries({
    "job_id": st.sampled_from(["a", "b-1", "c.d"]),
    "script": st.sampled_from(["examples/write_output.py", "-x.py", "a\tb.py", "s" * 300,
                               "ok/" + "n" * 256, "x.py"]),
    "args": st.lists(st.sampled_from(["--output-file", "o/a.json", "", "v", "w" * 300_000]),
                     max_size=20),
    "node": st.sampled_from(["rig-a", "any", "unassigned", "rig-b.gpu2", "rig.gpu"]),
    "gpu_id": st.integers(0, 255),
    "timeout": st.one_of(st.none(), st.sampled_from([1e-300, 0.005, 0.01, 5.0, 2.6e6])),
    "env": st.sampled_from([{}, {"JOB_X": "1"}, {"LD_PRELOAD": "x"}]),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry=job_entries, preserve=st.booleans())
def test_the_head_refuses_every_message_the_worker_would_refuse(entry: dict[str, Any],
                                                                preserve: bool) -> None:
    options = SubmitOptions(output_dir="o", preserve_paths=preserve)
    try:
        plan = prepare([entry], options)
    except InvalidJobsError:
        return  # refused at the head: nothing reaches a worker
    (spec,) = plan.specs
    JobSpec.from_message(spec.to_message())  # the worker's own check accepts it


def test_a_message_the_worker_refuses_fails_its_job(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a"]) as bench:
        run_id = "20261201-000000-abcdef"
        plan = prepare([bench.job("big", "rig-a")], SubmitOptions(output_dir="o"),
                       run_id=run_id)
        client = JobTracker(redis.Redis.from_url(bench.server.url))
        record_run(client.client, plan)
        message = plan.specs[0].to_message()
        # A message the worker refuses (its args are over the limit) for a recorded job.
        message["args"] = [*message["args"], "z" * (MAX_ARGS_CHARS + 1)]
        send_raw(bench.server, message, task_id=task_id_for(plan.specs[0]))
        wait_for(lambda: client.record(run_id, "big", "state").get("state") == "failed", 60,
                 "the refused job to be failed")
        record = client.record(run_id, "big")
        assert record["state"] == JobState.FAILED
        assert record["error"].startswith("refused by the worker: args are longer than")
        log = bench.workdir / "worker-logs" / "worker-rig-a.log"
        wait_for(lambda: "its job is failed" in log.read_text(), 30, "the refusal's log line")
        assert "Traceback" not in log.read_text()


def test_a_failed_job_is_one_log_line_on_the_worker(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a"]) as bench:
        from coordinator import submit

        run = submit([bench.job("bad", "rig-a", "--fail-attempts", "5")], output_dir="o",
                     workdir=tmp_path, broker_url=bench.server.url)
        assert run.wait(timeout=60).jobs[0].state is JobState.FAILED
        log = bench.workdir / "worker-logs" / "worker-rig-a.log"
        wait_for(lambda: "raised expected: JobFailed" in log.read_text(), 30,
                 "the task's failure line")
        text = log.read_text()
        assert "Traceback" not in text and "raised unexpected" not in text
        assert sum(1 for line in text.splitlines() if "JobFailed" in line) == 1


def test_recover_says_how_many_it_published_and_how_many_were_done(tmp_path: Path) -> None:
    with make_bench(tmp_path, ["rig-a"]) as bench:
        jobs = [bench.job(f"r{index}", "rig-a") for index in range(3)]
        (tmp_path / "o").mkdir(exist_ok=True)
        for index in (0, 1):
            (tmp_path / "o" / f"r{index}.json.done").write_text("{}\n")
        path = write_jobs(tmp_path / "recover.json", jobs)
        result = run_cli("recover", "--jobs-file", str(path), "--output-dir", "o", "--workdir",
                         str(tmp_path), "--broker", bench.server.url, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "published 1 jobs (2 already done, not published)" in result.stderr


def test_a_hand_made_message_cannot_write_lines_into_the_worker_log(tmp_path: Path) -> None:
    """Celery logs a message's shown name (``shadow``) and id on receipt, before any check:
    the worker makes each one printable line first."""
    with make_bench(tmp_path, ["rig-a"]) as bench:
        message = {"run_id": "20261129-000000-000000", "job_id": "x"}
        send_raw(bench.server, message, task_id="forged\nFORGED ID LINE",
                 shadow="job x\nFORGED NAME LINE\r\x1b[2J")
        log = bench.workdir / "worker-logs" / "worker-rig-a.log"
        wait_for(lambda: "forged?FORGED ID LINE" in log.read_text(), 30,
                 "the message's receipt in the log")
        lines = log.read_text().splitlines()
        assert not [line for line in lines if line.startswith(("FORGED", "\x1b"))], lines
        assert any("job x?FORGED NAME LINE" in line for line in lines)
        from coordinator import submit  # the worker lives on and runs the next job

        run = submit([bench.job("after", "rig-a")], output_dir="o", workdir=tmp_path,
                     broker_url=bench.server.url)
        assert run.wait(timeout=60).all_succeeded


def test_a_missing_script_is_refused_at_submit_where_the_scripts_are_in_sight(
        tmp_path: Path) -> None:
    """With the scripts directory on this machine (--scripts-dir), a missing script is exit 2
    in one line, --dry-run too, and nothing is published; built-in scripts count as there."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "step.py").write_text("print('step')\n")
    jobs = write_jobs(tmp_path / "jobs.json", [
        {"job_id": "here", "script": "step.py", "args": [], "node": "rig-a"},
        {"job_id": "built_in", "script": "examples/write_output.py",
         "args": ["--output-file", "x/b.json"], "node": "rig-a"},
        {"job_id": "gone", "script": "stpe.py", "args": [], "node": "rig-b"}])
    expected = (f"coordinator: error: jobs: job 2 (job_id 'gone'): field 'script': 'stpe.py' "
                f"not found in scripts directory {scripts.resolve()} (see --scripts-dir)")
    from coordinator.redis_server import RedisServer

    with RedisServer() as server:
        for extra in (["--dry-run"], []):
            refused = run_cli("submit", "--jobs-file", str(jobs), "--scripts-dir", str(scripts),
                              "--broker", server.url, *extra, cwd=tmp_path)
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert refused.stderr.strip().splitlines() == [expected]
        assert redis.Redis.from_url(server.url).dbsize() == 0  # nothing published
    # Without it the scripts live on the workers: the plan says they were not checked.
    unchecked = run_cli("submit", "--jobs-file", str(jobs), "--dry-run", cwd=tmp_path)
    assert unchecked.returncode == 0, unchecked.stderr
    assert unchecked.stderr.splitlines() == [
        "coordinator: the jobs' scripts were not checked here (they live on the workers; "
        "--scripts-dir DIR checks them before anything is published)"]


def test_an_unknown_field_is_named_once_and_not_refused(tmp_path: Path) -> None:
    """A typo must not pass silently, and an unknown key still does not make a file fail
    (DESIGN.md): each unknown field is named once, with the first job that has it."""
    jobs = write_jobs(tmp_path / "jobs.json", [
        {"job_id": "a", "script": "examples/write_output.py", "args": [], "node": "rig-a",
         "colour": "blue"},
        {"job_id": "b", "script": "examples/write_output.py", "args": [], "node": "rig-a",
         "retires": 2},
        {"job_id": "c", "script": "examples/write_output.py", "args": [], "node": "rig-a",
         "retires": 2}])
    dry = run_cli("submit", "--jobs-file", str(jobs), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    named = [line for line in dry.stderr.splitlines() if "unknown field" in line]
    assert named == [
        f"{jobs}: job 0 (job_id 'a'): unknown field 'colour' ignored (a typo? the fields are "
        f"job_id, script, args, node, gpu_id, timeout, env, retries, retry_delay, pin, warm, "
        f"after, cost, speculate); later jobs with it are not named",
        f"{jobs}: job 1 (job_id 'b'): unknown field 'retires' ignored (a typo? the fields are "
        f"job_id, script, args, node, gpu_id, timeout, env, retries, retry_delay, pin, warm, "
        f"after, cost, speculate); later jobs with it are not named"]
