"""Property-based: malformed and adversarial jobs files and worker messages (hypothesis).

At the head node, any jobs file is either planned whole or refused with one line
(exit 2, nothing published); every message the head node plans is one a worker
accepts. On the worker, any message is either a valid job or refused with one
line (``InvalidMessage``); sent to a real worker, hostile messages run nothing
and the worker stays up.
"""

from __future__ import annotations

import json
import string
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.errors import InvalidJobsError
from coordinator.local import LocalCluster
from coordinator.options import SubmitOptions
from coordinator.redis_server import RedisServer
from coordinator.submission import prepare
from tests.helpers import run_cli
from worker_tasks.celery_app import make_app
from worker_tasks.spec import RUN_JOB_TASK, InvalidMessage, JobSpec

SEED_JOB = {"job_id": "chunk_0000", "script": "full_scoring_worker.py",
            "args": ["--seeds-file", "scoring_chunks/chunk_0000.json", "--train-history",
                     "train_history.json", "--output-file",
                     "full_scoring_results/chunk_0000.json", "--prng-type", "java_lcg",
                     "--mod", "1000"], "node": "rig-a", "gpu_id": 0}
FIELDS = ["job_id", "script", "args", "node", "gpu_id", "timeout", "env", "retries",
          "retry_delay", "pin", "seeds", "prng_type", "mod", "train_history", "skip"]

# Strings that break naive code: NUL, newlines, lone surrogates, path tricks, huge numbers.
nasty_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "..", "../x", "/etc/passwd", "~/x", "a\0b", "rig-a\n", "\ud800",
                     "LD_PRELOAD", "OPENSSL_CONF", "JOB_X", "x" * 300, "a=b", " ",
                     "full_scoring_worker.py", "node.unassigned", "\u202e", "%s%n"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
                    st.floats(allow_nan=True, allow_infinity=True), nasty_text)
json_values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(nasty_text, children, max_size=4)),
    max_leaves=12)


@st.composite
def mutated_jobs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid original-format job with some fields replaced, dropped or added."""
    job = dict(SEED_JOB, job_id=f"j{draw(st.integers(0, 5))}")
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            job[name] = draw(json_values)
        else:
            job.pop(name, None)
    return job


jobs_files = st.one_of(json_values, st.lists(mutated_jobs(), min_size=0, max_size=4),
                       st.lists(st.one_of(mutated_jobs(), json_values), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=jobs_files)
def test_any_jobs_file_is_planned_whole_or_refused_in_one_line(document: Any,
                                                                tmp_path_factory: Any) -> None:
    path = Path(tmp_path_factory.mktemp("jobs")) / "jobs.json"
    path.write_text(json.dumps(document))  # NaN/Infinity literals and escaped surrogates too
    try:
        plan = prepare(path, SubmitOptions(output_dir="out"))
    except InvalidJobsError as err:
        assert "\n" not in str(err)
        assert str(err).startswith((str(path), "jobs: ", "--output-dir"))
        return
    # Whatever the head node plans, a worker accepts as a message.
    for spec in plan.specs:
        assert JobSpec.from_message(json.loads(json.dumps(spec.to_message()))) == spec


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=60),
    st.text(alphabet=string.printable + "[]{}\"\\\0\ud800", max_size=60).map(
        lambda text: text.encode("utf-8", "surrogatepass"))))
def test_any_bytes_in_a_jobs_file_are_refused_in_one_line_or_planned(
        data: bytes, tmp_path_factory: Any) -> None:
    path = Path(tmp_path_factory.mktemp("raw")) / "jobs.json"
    path.write_bytes(data)
    try:
        prepare(path, SubmitOptions(output_dir="out"))
    except InvalidJobsError as err:
        assert "\n" not in str(err)


MESSAGE = {"run_id": "20261129-000000-abcdef", "job_id": "j", "script": "tools/ok.py",
           "args": ["--x", "1"], "node": "rig-a", "gpu_id": 2, "output_file": "out/j.json",
           "done_file": "out/j.json.done", "log_file": "out/logs/j.log"}
MESSAGE_FIELDS = [*MESSAGE, "timeout", "env", "retries", "retry_delay", "extra"]


@st.composite
def messages(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    message = dict(MESSAGE)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(MESSAGE_FIELDS))
        if draw(st.booleans()):
            message[name] = draw(json_values)
        else:
            message.pop(name, None)
    return message


@settings(max_examples=500, deadline=None)
@given(message=messages())
def test_any_message_is_a_valid_job_or_refused_in_one_line(message: Any) -> None:
    try:
        spec = JobSpec.from_message(message)
    except InvalidMessage as err:
        assert "\n" not in str(err) and str(err)
        return
    # Accepted: every path stays relative and inside, every name is safe.
    for path in (spec.script, spec.done_file, spec.log_file, spec.output_file or "x"):
        assert not path.startswith("/") and ".." not in path.split("/")
    assert 0 <= spec.gpu_id <= 255 and "\n" not in spec.node


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(document=st.lists(mutated_jobs(), min_size=1, max_size=3).filter(
    lambda jobs: any(set(job) != set(SEED_JOB) or job.get("gpu_id") != 0 for job in jobs)))
def test_the_cli_refuses_bad_files_with_exit_2_and_publishes_nothing(
        document: list[dict[str, Any]], redis_server: RedisServer,
        tmp_path_factory: Any) -> None:
    path = Path(tmp_path_factory.mktemp("cli")) / "jobs.json"
    path.write_text(json.dumps(document))
    try:
        prepare(path, SubmitOptions(output_dir="out"))
        return  # a valid file: nothing to check here
    except InvalidJobsError:
        pass
    client = redis.Redis.from_url(redis_server.url)
    runs_before = client.zcard("sc:runs")
    result = run_cli("submit", "--jobs-file", str(path), "--broker", redis_server.url)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("coordinator: error: ")
    assert "Traceback" not in result.stderr
    assert client.zcard("sc:runs") == runs_before


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(messages(), min_size=10, max_size=10))
def test_a_real_worker_runs_nothing_of_hostile_messages_and_stays_up(
        batch: list[Any], cluster: LocalCluster, cluster_workdir: Path) -> None:
    record = cluster_workdir / "hostile-ran.jsonl"
    base = {**MESSAGE, "script": "examples/write_output.py",
            "args": ["--output-file", "hostile/x.json", "--record", str(record)]}
    app = make_app(cluster.broker_url)
    app.conf.result_backend = None
    log = cluster_workdir / "worker-logs" / "worker-rig-a.log"
    ids = []
    for message in batch:
        if isinstance(message, dict):  # the mutated fields over a runnable base
            changed = {k: v for k, v in message.items() if v != MESSAGE.get(k, ...)}
            dropped = [k for k in MESSAGE if k not in message]
            message = {k: v for k, v in {**base, **changed}.items() if k not in dropped}
        task_id = f"prop-{uuid.uuid4().hex[:12]}"
        ids.append(task_id)
        app.send_task(RUN_JOB_TASK, args=[message], queue="node.rig-a", task_id=task_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        if all(f"refused message {task_id}" in text or f"(message {task_id}): " in text
               for task_id in ids):
            break
        time.sleep(0.2)
    text = log.read_text()
    for task_id in ids:
        assert f"refused message {task_id}" in text or f"(message {task_id}): " in text
    assert not record.exists()  # nothing executed
    assert cluster.workers["rig-a"].poll() is None  # the worker is up
