"""The worker's own rules, which hold whatever a message says (no broker needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.waiting import alive, wait_for
from worker_tasks import warm
from worker_tasks.daemon import PidFileState, read_pidfile
from worker_tasks.run_job import (
    JobRefused,
    check_output,
    confine,
    output_tail,
    resolve_script,
    script_env,
)
from worker_tasks.runner import Runner
from worker_tasks.spec import (
    InvalidMessage,
    JobSpec,
    done_path_for,
    node_of_queue,
    queue_for,
    slot_of,
)


@pytest.fixture()
def scripts(tmp_path: Path) -> Path:
    base = tmp_path / "scripts"
    (base / "tools").mkdir(parents=True)
    (base / "tools" / "ok.py").write_text("print('ok')\n")
    (tmp_path / "outside.py").write_text("print('outside')\n")
    (base / "link_out.py").symlink_to(tmp_path / "outside.py")
    (base / "link_in.py").symlink_to(base / "tools" / "ok.py")
    return base


def test_scripts_resolve_only_inside_the_scripts_directory(scripts: Path) -> None:
    assert resolve_script(scripts, "tools/ok.py") == scripts / "tools" / "ok.py"
    assert resolve_script(scripts, "link_in.py") == scripts / "tools" / "ok.py"
    for script, message in [
        ("/etc/passwd", "is not a path inside"),
        ("../outside.py", "is not a path inside"),
        ("tools/../../outside.py", "is not a path inside"),
        ("link_out.py", "resolves outside"),
        ("tools/missing.py", "not found in scripts directory"),
        ("tools", "not found in scripts directory"),  # a directory is not a script
    ]:
        with pytest.raises(JobRefused, match=message):
            resolve_script(scripts, script)


def test_marker_log_and_output_paths_are_confined_to_the_workdir(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "escape").symlink_to(tmp_path)
    assert confine(work, "out/x.json.done", "done_file") == work / "out" / "x.json.done"
    for path, message in [("/tmp/x.done", "is not a path inside"),
                          ("../x.done", "is not a path inside"),
                          ("escape/planted.done", "resolves outside")]:
        with pytest.raises(JobRefused, match=message):
            confine(work, path, "done_file")


MESSAGE = {"run_id": "20261129-000000-abcdef", "job_id": "j", "script": "tools/ok.py",
           "args": ["--x", "1"], "node": "rig-a", "gpu_id": 2, "output_file": "out/j.json",
           "done_file": "out/j.json.done", "log_file": "out/logs/j.log"}


@pytest.mark.parametrize(("changes", "expected"), [
    ({"gpu_id": "0,1,2,3"}, "gpu_id must be an integer, not str"),
    ({"gpu_id": True}, "gpu_id must be an integer, not bool"),
    ({"gpu_id": 10**30}, "gpu_id 1000000000000000000000000000000 is outside 0..255"),
    ({"env": {"OPENSSL_CONF": "/tmp/evil.cnf"}}, "env may not set OPENSSL_CONF"),
    ({"env": {"BASH_ENV": "x", "GCONV_PATH": "y"}}, "env may not set BASH_ENV, GCONV_PATH"),
    ({"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "env may not set NVIDIA_VISIBLE_DEVICES"),
    ({"env": {"LD_PRELOAD": "/x.so"}}, "env may not set LD_PRELOAD"),
    ({"env": {"JOB_X": "a\0b"}}, "env JOB_X contains a NUL byte"),
    ({"env": {"": "x"}}, "env name '' is not a variable name"),
    ({"env": "JOB_X=1"}, "env must be an object"),
    ({"done_file": "/tmp/planted.json.done"}, "done_file '/tmp/planted.json.done' is not a "
                                               "relative path"),
    ({"done_file": "../../planted.done"}, "climbs out of its directory"),
    ({"log_file": "/etc/cron.d/x.log"}, "log_file '/etc/cron.d/x.log' is not a relative path"),
    ({"output_file": "../x.json"}, "output_file '../x.json' climbs out"),
    ({"done_file": "out/j.json"}, "must end in .done / .log"),
    ({"log_file": "out/j.txt"}, "must end in .done / .log"),
    ({"script": "/usr/bin/python3"}, "script '/usr/bin/python3' is not a relative path"),
    ({"args": "--x 1"}, "args must be a list of strings"),
    ({"args": [1]}, "args[0] must be a string, not int"),
    ({"args": ["\ud800"]}, "args[0] is not valid text (a lone surrogate)"),
    ({"timeout": float("inf")}, "timeout inf must be finite"),
    ({"timeout": float("nan")}, "timeout nan must be finite"),
    ({"timeout": -1}, "timeout -1 must be finite, > 0"),
    ({"node": "rig-a\n"}, "node 'rig-a\\n' is not a safe name"),
    ({"job_id": "../x"}, "job_id '../x' is not a safe name"),
    ({"run_id": "a/b"}, "run_id 'a/b' is not a run id"),
    ({"retries": -1}, "retries must be an integer in 0..100"),
    ({"surprise": 1}, "message has unknown fields 'surprise'"),
    ({"job_id": ...}, "message lacks job_id"),
])
def test_every_field_of_a_message_is_checked(changes: dict[str, object], expected: str) -> None:
    message = {**MESSAGE, **changes}
    message = {key: value for key, value in message.items() if value is not ...}
    with pytest.raises(InvalidMessage) as caught:
        JobSpec.from_message(message)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_good_message_and_wrong_shapes() -> None:
    spec = JobSpec.from_message({**MESSAGE, "env": {"JOB_STEP": "5", "OMP_NUM_THREADS": "4"},
                                 "timeout": 30, "retries": 2})
    assert spec.gpu_id == 2 and spec.timeout == 30.0 and spec.retries == 2
    for shape in (None, [], "text", 3):
        with pytest.raises(InvalidMessage, match="a job message must be an object"):
            JobSpec.from_message(shape)


def test_the_allow_list_can_be_widened_by_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_JOB_ENV_ALLOW", r"JOB_[A-Z]+|STEP")
    assert JobSpec.from_message({**MESSAGE, "env": {"STEP": "5"}}).env == {"STEP": "5"}
    with pytest.raises(InvalidMessage, match="env may not set OMP_NUM_THREADS"):
        JobSpec.from_message({**MESSAGE, "env": {"OMP_NUM_THREADS": "4"}})


def test_the_script_sees_its_gpu_and_env_but_not_the_broker_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_BROKER_URL", "redis://:secret@head:6379/0")
    monkeypatch.setenv("SC_TRACKING_URL", "redis://:secret@head:6379/0")
    env = script_env(JobSpec.from_message({**MESSAGE, "env": {"JOB_STEP": "5"}}), attempt=2)
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["JOB_STEP"] == "5"
    assert (env["SC_JOB_ID"], env["SC_NODE"], env["SC_ATTEMPT"]) == ("j", "rig-a", "2")
    assert "SC_BROKER_URL" not in env and "SC_TRACKING_URL" not in env




def test_a_killed_runner_takes_every_descendant_with_it(tmp_path: Path) -> None:
    """Children, a child in its own session (setsid), a double-forked daemon: all killed."""
    pids = tmp_path / "pids"
    script = tmp_path / "spawner.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        f"pids = open({str(pids)!r}, 'a')\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "detached = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                            start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        pids.write(f'{os.getpid()}\\n'); pids.flush(); time.sleep(60)\n"
        "    os._exit(0)\n"
        "pids.write(f'{os.getpid()}\\n{child.pid}\\n{detached.pid}\\n'); pids.flush()\n"
        "time.sleep(60)\n")
    runner = Runner([sys.executable, str(script)], tmp_path, dict(os.environ),
                    tmp_path / "spawner.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(pids.read_text().split()
                                               if pids.exists() else []) < 4:
        time.sleep(0.05)
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 4 and all(alive(pid) for pid in started)
    outcome = runner.kill()
    assert outcome.signal == 9
    assert [pid for pid in started if alive(pid)] == []


def test_a_finished_script_leaves_no_orphan_and_reports_its_status(tmp_path: Path) -> None:
    pidfile = tmp_path / "orphan.pid"
    script = tmp_path / "leaver.py"
    script.write_text(
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                     start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('bye', flush=True)\n"
        "sys.exit(3)\n")
    runner = Runner([sys.executable, str(script)], tmp_path, dict(os.environ),
                    tmp_path / "leaver.log")
    outcome = runner.wait(30)
    assert outcome is not None and (outcome.exit_code, outcome.signal) == (3, None)
    assert not alive(int(pidfile.read_text()))
    assert (tmp_path / "leaver.log").read_text() == "bye\n"
    killed = Runner(["/bin/sh", "-c", "kill -TERM $$"], tmp_path, dict(os.environ),
                    tmp_path / "x.log").wait(30)
    assert killed is not None and (killed.exit_code, killed.signal) == (None, 15)


def test_output_rule(tmp_path: Path) -> None:
    assert "was not written" in check_output(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    assert "not valid JSON" in check_output(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text("[]")
    (tmp_path / "data.bin").write_bytes(b"\x00")  # not JSON: existence is enough
    assert check_output(tmp_path / "ok.json") is None
    assert check_output(tmp_path / "data.bin") is None
    assert check_output(None) is None


def test_the_error_tail_is_this_attempts_output_only(tmp_path: Path) -> None:
    log = tmp_path / "j.log"
    log.write_text("old attempt line\n")
    offset = log.stat().st_size
    with log.open("a") as fh:
        fh.write("[scripts-coordinator] attempt 2 of j\n")
        fh.writelines(f"line {i}\n" for i in range(30))
    tail = output_tail(log, offset)
    assert tail.splitlines() == [f"line {i}" for i in range(10, 30)]
    assert json.dumps(tail)  # travels in JSON


# Exact messages, bounds and defaults (edges found by tools/mutation-test).

@pytest.mark.parametrize(("changes", "expected"), [
    ({"job_id": ..., "node": ...}, "message lacks job_id, node"),
    ({"zz": 1, "aa": 2}, "message has unknown fields 'aa', 'zz'"),
    ({"run_id": 7}, "run_id must be a string, not int"),
    ({"per_gpu": "yes"}, "per_gpu must be true or false, not 'yes'"),
    ({"warm": 1}, "warm must be true or false, not 1"),
    ({"speculate": "yes"}, "speculate must be true or false, not 'yes'"),
    ({"copy": 1}, "copy must be true or false, not 1"),
    ({"copy": True, "node": "any"}, "a backup copy names the slot it runs on, not 'any'"),
    ({"retry_delay": -1}, "retry_delay -1 must be finite, >= 0 and at most 3600"),
    ({"retry_delay": "2"}, "retry_delay must be a number of seconds, not str"),
    ({"retries": 101}, "retries must be an integer in 0..100, not 101"),
    ({"gpu_id": 256}, "gpu_id 256 is outside 0..255"),
    ({"env": ["JOB_X"]}, "env must be an object of strings, not list"),
    ({"env": {f"JOB_{i}": "" for i in range(65)}}, "env has 65 entries (at most 64)"),
    ({"env": {"JOB_\0": "x"}}, "an env name contains a NUL byte"),
    ({"env": {"JOB=X": "x"}}, "env name 'JOB=X' is not a variable name (letters, digits, '_'; "
                              "not a digit first)"),
    ({"env": {"\n": None}}, "env name '\\n' is not a variable name (letters, digits, '_'; "
                             "not a digit first)"),  # found by hypothesis: once two lines
    ({"args": {"a": 1}}, "args must be a list of strings, not dict"),
    ({"args": ["x"] * 4097}, "args has 4097 entries (at most 4096)"),
    ({"args": ["x" * (1 << 19), "y" * ((1 << 19) + 1)]},
     "args are longer than 1048576 characters in all"),
])
def test_each_refusal_reads_exactly(changes: dict[str, object], expected: str) -> None:
    message = {key: value for key, value in {**MESSAGE, **changes}.items() if value is not ...}
    with pytest.raises(InvalidMessage) as caught:
        JobSpec.from_message(message)
    assert str(caught.value) == expected
    with pytest.raises(InvalidMessage) as caught:
        JobSpec.from_message(None)
    assert str(caught.value) == "a job message must be an object, not NoneType"


def test_a_message_reads_back_field_for_field_at_the_bounds() -> None:
    full = {**MESSAGE, "gpu_id": 255, "retries": 100, "retry_delay": 0, "per_gpu": True,
            "warm": False, "timeout": 2.5, "env": {f"JOB_{i}": str(i) for i in range(64)},
            "args": ["x" * (1 << 19), "y" * (1 << 19)],
            "task_id": f"{MESSAGE['run_id']}.{MESSAGE['job_id']}.0"}
    spec = JobSpec.from_message(full)
    assert spec.to_message() == {**full, "retry_delay": 0.0}
    assert JobSpec.from_message(spec.to_message()) == spec
    assert JobSpec.from_message({**MESSAGE, "args": ["a"] * 4096}).args == ["a"] * 4096
    plain = JobSpec.from_message({k: v for k, v in MESSAGE.items() if k != "output_file"})
    assert (plain.output_file, plain.timeout, plain.env, plain.retries, plain.retry_delay,
            plain.per_gpu, plain.warm, plain.task_id) == (None, None, {}, 0, 2.0, False, None,
                                                          None)
    assert (plain.queue, plain.slot) == ("node.rig-a", "rig-a")
    assert (spec.queue, spec.slot) == ("node.rig-a.gpu255", "rig-a.gpu255")


def test_speculate_and_copy_read_back() -> None:
    # speculate: the head's word on backup copies (None: as the run says); copy: this message
    # is a job's backup copy, pinned to the slot it runs on.
    for speculate in (True, False):
        spec = JobSpec.from_message({**MESSAGE, "speculate": speculate, "copy": True})
        assert (spec.speculate, spec.copy) == (speculate, True)
        assert JobSpec.from_message(spec.to_message()) == spec
    plain = JobSpec.from_message(MESSAGE)
    assert (plain.speculate, plain.copy) == (None, False)
    assert JobSpec.from_message({**MESSAGE, "node": "any", "copy": False}).copy is False


def test_queue_names_and_the_done_rule() -> None:
    assert queue_for("rig-a") == "node.rig-a" and queue_for("rig-a", 3) == "node.rig-a.gpu3"
    assert slot_of("rig-a") == "rig-a" and slot_of("rig-a", 0) == "rig-a.gpu0"
    assert [node_of_queue(q) for q in ("node.rig-a", "node.rig-a.gpu12", "node.gpu.node",
                                       "celery", "xnode.rig-a")] == [
        "rig-a", "rig-a", "gpu.node", None, None]
    assert done_path_for("o/a.json", "out", "j") == "o/a.json.done"
    assert done_path_for(None, "results/X/", "j") == "results/X/j.json.done"
    assert done_path_for("", "out", "j") == "out/j.json.done"


@pytest.mark.parametrize(("changes", "expected"), [
    ({"job_id": "a..b"}, "job_id 'a..b' is not a safe name (letters, digits, '.', '_', '-'; "
                         "no '..')"),
    ({"job_id": 7}, "job_id must be a string, not int"),
    ({"script": "~/x.py"}, "script '~/x.py' is not a relative path"),
    ({"script": 7}, "script must be a string, not int"),
    ({"timeout": 0}, "timeout 0 must be finite, > 0 and at most 2.592e+06"),
    ({"timeout": 2_592_001}, "timeout 2592001 must be finite, > 0 and at most 2.592e+06"),
])
def test_names_paths_and_seconds_read_exactly(changes: dict[str, object], expected: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        JobSpec.from_message({**MESSAGE, **changes})
    assert str(caught.value) == expected
    with pytest.raises(InvalidMessage) as caught:
        JobSpec.from_message([])
    assert str(caught.value) == "a job message must be an object, not list"


def test_seconds_at_their_bounds_are_accepted() -> None:
    assert JobSpec.from_message({**MESSAGE, "timeout": 0.5}).timeout == 0.5
    assert JobSpec.from_message({**MESSAGE, "timeout": 2_592_000}).timeout == 2_592_000.0
    assert JobSpec.from_message({**MESSAGE, "retry_delay": 3600}).retry_delay == 3600.0


# The title Celery gives its main process where setproctitle is installed.
CELERY_TITLE = ("[celeryd: rig-z@host:MainProcess] -active- (-A worker_tasks worker --queues "
                "node.rig-z --concurrency 1)")


@pytest.mark.parametrize("retitled", [False, True])
def test_a_pid_file_finds_its_worker_even_when_celery_retitles_it(tmp_path: Path,
                                                                   retitled: bool) -> None:
    """``worker --stop`` and ``cluster down`` find the worker by its queue among its arguments.

    Where setproctitle is installed Celery rewrites its command line into one string; the
    queue must still be found there (``--stop`` said "not running" and left it running).
    """
    code = ("import setproctitle, sys, time; setproctitle.setproctitle(sys.argv[1]); "
            "time.sleep(60)")
    argv = [sys.executable, "-c", code, CELERY_TITLE] if retitled else [
        sys.executable, "-c", "import time; time.sleep(60)", "--queues", "node.rig-z"]
    process = subprocess.Popen(argv)
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        # Until Python has retitled itself, the title is one argument among others. Plain:
        # checked at once, as `worker --detach` then `--stop` would (Popen returns while the
        # child is still inside its exec, its arguments not yet visible).
        if retitled:
            wait_for(lambda: cmdline.read_bytes().startswith(b"[celeryd") and
                     b"\0" not in cmdline.read_bytes().rstrip(b"\0"), 30, "the new title")
        pidfile = tmp_path / "worker.pid"
        pidfile.write_text(f"{process.pid}\n")
        assert read_pidfile(pidfile, "node.rig-z") == PidFileState(pid=process.pid, alive=True)
        for other in ("node.rig-y", "node.rig-zz", "rig-z"):  # another node's worker is not it
            assert not read_pidfile(pidfile, other).alive
    finally:
        process.kill()
        process.wait()
    assert read_pidfile(pidfile, "node.rig-z") == PidFileState(pid=process.pid, alive=False)


def test_slots_queues_and_worker_names_parse_back() -> None:
    from worker_tasks.spec import (
        floating_queue,
        gpu_of_slot,
        node_of_slot,
        slot_of_queue,
        slot_of_worker,
        worker_name,
    )

    assert floating_queue() == "node.any"
    assert [gpu_of_slot(slot) for slot in ("rig-a", "rig-a.gpu0", "rig-a.gpu12", "gpu3")] == [
        None, 0, 12, None]
    assert [slot_of_queue(queue) for queue in ("node.rig-a", "node.rig-a.gpu1", "nodes.x",
                                               "celery")] == ["rig-a", "rig-a.gpu1", None, None]
    assert slot_of_worker(worker_name("rig-a.gpu1", "box@x")) == "rig-a.gpu1"
    assert slot_of_worker("rig-b") == "rig-b"
    assert node_of_slot("rig-a.gpu1") == "rig-a" and node_of_slot("rig.gpux") == "rig.gpux"


def test_a_floating_job_is_placed_on_the_slot_that_takes_it() -> None:
    floating = JobSpec.from_message({**MESSAGE, "node": "any", "gpu_id": 7})
    assert floating.floating and floating.queue == "node.any"
    on_node = floating.placed_on("rig-b")
    assert (on_node.node, on_node.gpu_id, on_node.per_gpu, on_node.slot, on_node.queue) == (
        "rig-b", 7, False, "rig-b", "node.rig-b")
    on_gpu = floating.placed_on("rig-c.gpu2")
    assert (on_gpu.node, on_gpu.gpu_id, on_gpu.per_gpu, on_gpu.slot) == (
        "rig-c", 2, True, "rig-c.gpu2")
    assert on_gpu.job_id == floating.job_id and on_gpu.args == floating.args
    pinned = JobSpec.from_message(MESSAGE)
    assert not pinned.floating and pinned.placed_on("rig-z.gpu1") is pinned


def test_text_checks_pass_unicode_and_refuse_surrogates() -> None:
    from worker_tasks.spec import check_text

    assert check_text("Zürich ✓", "x") == "Zürich ✓"
    with pytest.raises(InvalidMessage, match=r"x is not valid text \(a lone surrogate\)"):
        check_text("a\udc80", "x")
    with pytest.raises(InvalidMessage, match="x contains a NUL byte"):
        check_text("a\0", "x")


def test_a_messages_optional_fields_and_their_defaults_are_the_contracts() -> None:
    """What a message may leave out, and what it then means (records store only the rest)."""
    from worker_tasks.spec import JobSpec

    assert JobSpec.defaults() == {"timeout": None, "env": {}, "retries": 0,
                                  "retry_delay": 2.0, "per_gpu": False, "warm": None,
                                  "task_id": None, "after": [], "cost": None,
                                  "speculate": None, "copy": False}
    assert JobSpec.defaults()["env"] is not JobSpec.defaults()["env"]  # a fresh dict each


@pytest.mark.parametrize(("task_id", "expected"), [
    (7, "task_id must be a string, not int"),
    ("run.j\0.0", "task_id contains a NUL byte"),
    ("run.j\ud800.0", "task_id is not valid text (a lone surrogate)"),
])
def test_a_bad_task_id_is_refused_by_name(task_id: object, expected: str) -> None:
    from worker_tasks.spec import InvalidMessage, JobSpec

    message = {"run_id": "20260101-000000-aaaaaa", "job_id": "j", "script": "s.py",
               "args": [], "node": "rig-a", "gpu_id": 0, "done_file": "o/j.done",
               "log_file": "o/j.log", "task_id": task_id}
    with pytest.raises(InvalidMessage) as raised:
        JobSpec.from_message(message)
    assert str(raised.value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("300%", "300%"), ("12.5%", "12.5%"), ("0.001%", "0.001%"), ("100000%", "100000%"),
    ("007%", "7%"), (30, 30.0), (0.01, 0.01),
])
def test_a_timeout_is_seconds_or_a_share_of_the_median(value: object, expected: object) -> None:
    from worker_tasks.spec import check_timeout

    assert check_timeout(value) == expected


@pytest.mark.parametrize("value", ["300", "0%", "-5%", "100000.5%", "abc%", "%", "5 %",
                                   "1234567%", "1.2345%"])
def test_a_timeout_that_is_neither_seconds_nor_a_share_is_refused(value: str) -> None:
    from worker_tasks.spec import InvalidMessage, check_timeout

    with pytest.raises(InvalidMessage) as raised:
        check_timeout(value, "timeout")
    assert str(raised.value) == (f"timeout {value!r} is neither seconds nor a percentage of "
                                 f"the median (e.g. \"300%\", at most 100000%)")


def test_which_jobs_may_be_copied_and_where_each_execution_writes() -> None:
    from worker_tasks.copies import (
        may_copy,
        output_places,
        outputs_apart,
        private_output,
        with_output,
    )

    args = ["--seeds", "s.json", "--output-file", "o/x.json", "--mod", "7"]
    assert output_places(args, "o/x.json") == [3]
    assert output_places(["--output-file=o/x.json"], "o/x.json") == [0]
    assert output_places(["--output-file"], "o/x.json") == []  # no value
    assert not outputs_apart("o/x.json", [*args, "--output-file=o/x.json"])  # named twice
    assert not outputs_apart(None, args) and outputs_apart("o/x.json", args)
    assert may_copy(True, True, False, "o/x.json", args)
    assert not may_copy(False, True, False, "o/x.json", args)  # pinned
    assert not may_copy(True, False, False, "o/x.json", args)  # speculate false
    assert not may_copy(True, True, True, "o/x.json", args)  # per GPU
    assert not may_copy(True, True, False, "o/y.json", args)  # not named by --output-file
    assert private_output("o/x.json", "run.x.3") == "o/.x.json.part-3.json"
    assert private_output("x.npz", "r.x.12") == ".x.npz.part-12.npz"
    odd = private_output("o/x.json", "../../etc/passwd")  # a task id of another shape
    assert odd.startswith("o/.x.json.part-") and "/" not in odd[2:] and odd.endswith(".json")
    assert len(odd) == len("o/.x.json.part-.json") + 12
    assert with_output(args, "o/x.json", "o/.p.json") == [
        "--seeds", "s.json", "--output-file", "o/.p.json", "--mod", "7"]
    assert with_output(["--output-file=o/x.json"], "o/x.json", "o/.p.json") == [
        "--output-file=o/.p.json"]


def test_a_delivery_is_the_jobs_live_copy_only_while_the_record_says_so() -> None:
    from worker_tasks.run_job import as_seen_by, is_live_copy

    record = {"state": "running", "task_id": "r.j.0",
              "copy": {"task_id": "r.j.1", "state": "running"}}
    assert is_live_copy(record, "r.j.1") and not is_live_copy(record, "r.j.0")
    assert as_seen_by(record, "r.j.1")["task_id"] == "r.j.1"
    assert as_seen_by(record, "r.j.9")["task_id"] == "r.j.0"
    for copy_state in ("won", "failed", "superseded", "took over", "bogus"):
        assert not is_live_copy({**record, "copy": {"task_id": "r.j.1", "state": copy_state}},
                                "r.j.1")
    assert not is_live_copy({**record, "state": "succeeded"}, "r.j.1")
    assert is_live_copy({**record, "state": "queued",
                         "copy": {"task_id": "r.j.1", "state": "queued"}}, "r.j.1")
    assert not is_live_copy({"state": "running", "task_id": "r.j.0"}, "r.j.1")


@pytest.mark.parametrize(("source", "uses"), [
    ("import os, sys\nfrom collections import abc\n", False),
    ("import os.path\ndef main():\n    import json\n", False),  # imports anywhere count
    ("import os\nimport numpy as np\n", True),  # preloaded
    ("import wave\n", True),  # a standard-library module, preloaded
    ("import scipy\n", True),  # not preloaded, but may import what is (NumPy)
    ("from scoring.vectorized import score\n", True),  # a module of a preloaded package
    ("from . import helper\n", True),  # relative: the script's own package
    ("import importlib\nimportlib.import_module('os')\n", True),  # named at run time
    ("__import__('os')\n", True),
    ("import os\ndef broken(:\n", True),  # cannot be read: as if it used it
    # It sets what preloaded modules read at import: its own import of NumPy must read it.
    ("import os\nos.environ['OMP_NUM_THREADS'] = '1'\nimport numpy\n", False),
    ("import os\nos.environ.setdefault('NUMBA_NUM_THREADS', '2')\nimport importlib\n", False),
    ('"""Set OMP_NUM_THREADS before you run it."""\nimport numpy\n', True),  # prose
])
def test_a_script_uses_the_preload_unless_it_imports_only_the_rest_of_the_stdlib(
        tmp_path: Path, source: str, uses: bool) -> None:
    script = tmp_path / "job.py"
    script.write_text(source)
    assert warm.uses_preload(script, ["numpy", "scoring.warm_engines", "wave"]) is uses


def test_a_scripts_imports_are_read_again_once_it_changes(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("import os\n")
    assert not warm.uses_preload(script, ["numpy"])
    script.write_text("import numpy\n")  # another size: another version of the file
    assert warm.uses_preload(script, ["numpy"])
    assert warm.uses_preload(tmp_path / "missing.py", ["numpy"])
