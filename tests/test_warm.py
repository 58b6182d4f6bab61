"""Warm jobs: each job's interpreter forked from the worker's zygote, with the guarantees of a
cold one. Real workers (``SC_WARM``, as ``coordinator worker --warm`` sets it) on the
suite's Redis; the jobs run ``tests/warm_probe.py``, which reports what it sees.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator import JobState, submit
from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer
from tests.helpers import REPO, run_cli
from tests.waiting import alive, pool_process, wait_for
from worker_tasks.daemon import WARM_JOB_NAME
from worker_tasks.warm import DEFAULT_PRELOAD, PRELOAD_VARIABLE

NODE = "rig-warm"
ALONE = "rig-warm-alone"  # a node of its own, for the workers a test kills or breaks
# What a job's report may differ in from another job's: its own id and output file.
OWN_FIELDS = ("SC_JOB_ID", "SC_RUN_ID", "SC_ATTEMPT")


def probe(job_id: str, *extra: str, node: str = NODE, **fields: Any) -> dict[str, Any]:
    return {"job_id": job_id, "script": "tests/warm_probe.py", "node": node,
            "args": ["--output-file", f"w/{job_id}.json", *extra], **fields}


@pytest.fixture(scope="module")
def warm_cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[LocalCluster]:
    """One warm worker whose zygote has imported ``json`` (the probe marks it) and
    ``colorsys`` (which neither the zygote's code nor a probe imports)."""
    work = tmp_path_factory.mktemp("warm")
    with LocalCluster([NODE], scripts_dir=REPO, workdir=work, broker_url=redis_server.url,
                      extra_env={"SC_WARM": "1", "SC_PRELOAD": "json,colorsys"},
                      die_with_parent=True) as cluster:
        yield cluster


def run_jobs(cluster: LocalCluster, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run ``jobs`` to the end; job id -> its record."""
    run = submit(jobs, output_dir="w", workdir=cluster.workdir, broker_url=cluster.broker_url)
    status = run.wait(timeout=120)
    return {job.job_id: job for job in status.jobs}


def report(cluster: LocalCluster, job_id: str) -> dict[str, Any]:
    data = json.loads((cluster.workdir / "w" / f"{job_id}.json").read_text())
    for name in ("argv", "orig_argv"):
        data[name] = [arg.replace(job_id, "JOB") for arg in data[name]]
    data["env"] = {name: value for name, value in data["env"].items()
                   if name not in OWN_FIELDS}
    data.pop("runner")  # each job's own
    return data


def log_of(cluster: LocalCluster, job_id: str) -> str:
    return (cluster.workdir / "w" / "logs" / f"{job_id}.log").read_text()


def test_a_warm_job_sees_what_a_cold_one_sees(warm_cluster: LocalCluster) -> None:
    jobs = run_jobs(warm_cluster, [probe("warm_a"), probe("cold_a", warm=False)])
    assert {job.state for job in jobs.values()} == {JobState.SUCCEEDED}
    warm, cold = report(warm_cluster, "warm_a"), report(warm_cluster, "cold_a")
    assert (warm.pop("warm"), cold.pop("warm")) == (True, False)
    # The one difference: the preload is already imported.
    assert (warm.pop("colorsys_loaded"), cold.pop("colorsys_loaded")) == (True, False)
    # Field by field: __name__, argv, sys.path[0], cwd, the environment, descriptors, threads.
    assert warm == cold
    assert warm["name"] == "__main__" and warm["path0"] == str(REPO / "tests")
    assert warm["cwd"] == str(warm_cluster.workdir) and warm["fds"][:3] == [0, 1, 2]
    assert "not warm" not in log_of(warm_cluster, "warm_a")


def test_warm_and_cold_jobs_end_with_the_same_statuses(warm_cluster: LocalCluster) -> None:
    endings = {"status": ("--exit", "3"), "raise": ("--raise",), "text": ("--exit-text", "bye"),
               "segv": ("--segfault",), "hook": ("--raise", "--excepthook")}
    jobs = run_jobs(warm_cluster, [probe(f"{kind}_{mode}", *args, warm=mode == "warm")
                                   for kind, args in endings.items()
                                   for mode in ("warm", "cold")])
    for kind in endings:
        warm, cold = jobs[f"{kind}_warm"], jobs[f"{kind}_cold"]
        assert warm.state is cold.state is JobState.FAILED, (warm, cold)
        assert (warm.exit_code, warm.error.replace("warm=True", "warm=False").replace(
            f"{kind}_warm", f"{kind}_cold")) == (cold.exit_code, cold.error), kind
    assert (jobs["status_warm"].exit_code, jobs["segv_warm"].exit_code) == (3, -11)
    assert "script killed by signal 11" in jobs["segv_warm"].error
    assert "bye" in jobs["text_warm"].error
    # The traceback is the script's own, as python script.py prints it.
    log = log_of(warm_cluster, "raise_warm")
    assert (f'Traceback (most recent call last):\n  File "{REPO / "tests" / "warm_probe.py"}"'
            in log and "ValueError: the probe raised on purpose" in log), log
    assert "zygote.py" not in log and "runpy" not in log
    # A script's own sys.excepthook is what reports it, as in a cold interpreter.
    hooked = log_of(warm_cluster, "hook_warm")
    assert ("the probe's hook: ValueError: the probe raised on purpose" in hooked
            and "Traceback" not in hooked), hooked


def test_a_warm_job_writes_out_the_files_it_left_open_as_a_cold_one_does(
        warm_cluster: LocalCluster) -> None:
    # Only the interpreter's exit writes these (see the probe's --unclosed): a warm script
    # that leaves its output file open, in a script with a function, once ended with an
    # empty file where a cold one wrote its data.
    # So does an exit by an uncaught KeyboardInterrupt (Python's exit, then SIGINT), and one
    # with a daemon thread still running (a cold exit stops it, then closes the files).
    jobs = run_jobs(warm_cluster, [probe("open_warm", "--unclosed"),
                                   probe("open_cold", "--unclosed", warm=False),
                                   probe("open_int_warm", "--unclosed", "--interrupt"),
                                   probe("open_int_cold", "--unclosed", "--interrupt",
                                         warm=False),
                                   probe("open_daemon_warm", "--unclosed", "--daemon"),
                                   probe("open_daemon_cold", "--unclosed", "--daemon",
                                         warm=False)])
    assert {jobs[job_id].state for job_id in ("open_warm", "open_cold", "open_daemon_warm",
                                              "open_daemon_cold")} == {JobState.SUCCEEDED}
    interrupted = [(jobs[job_id].state, jobs[job_id].exit_code)
                   for job_id in ("open_int_warm", "open_int_cold")]
    assert interrupted == [(JobState.FAILED, -2)] * 2, interrupted
    for job_id in jobs:
        output = warm_cluster.workdir / "w" / f"{job_id}.json"
        held = {kind: Path(f"{output}.{kind}").read_text()
                for kind in ("main", "imported", "preloaded")
                + (("del",) if "daemon" not in job_id else ())}  # a cold exit's __del__ too
        assert held == dict.fromkeys(held, "kept\n"), (job_id, held)
        for kind in ("gz", "gzb"):  # only a close writes a gzip file's trailer
            assert gzip.decompress(Path(f"{output}.{kind}").read_bytes()) == b"kept\n", job_id
    assert report(warm_cluster, "open_warm")["warm"]
    assert report(warm_cluster, "open_daemon_warm")["warm"]


def test_what_a_job_leaves_behind_does_not_reach_the_next(warm_cluster: LocalCluster) -> None:
    first = run_jobs(warm_cluster, [probe("leaves", "--leave-state")])
    assert first["leaves"].state is JobState.SUCCEEDED
    second = run_jobs(warm_cluster, [probe("after")])
    assert second["after"].state is JobState.SUCCEEDED
    before, after = report(warm_cluster, "leaves"), report(warm_cluster, "after")
    assert after["warm"] and before["warm"]
    # A mark on a preloaded module, a new module, a variable, an open file, a thread.
    assert (after["json_mark"], after["wave_loaded"], after["leftover_env"]) == (
        None, False, None)
    assert after["fds"] == before["fds"] and after["threads"] == 1


def job_processes(job_id: str) -> list[int]:
    """Live processes of a job: its warm script and runner (by name) or anything it started
    (by its environment)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (name == WARM_JOB_NAME or
                             f"SC_JOB_ID={job_id}".encode() in environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def test_a_timed_out_or_cancelled_warm_job_takes_everything_it_started(
        warm_cluster: LocalCluster) -> None:
    jobs = run_jobs(warm_cluster, [probe("slow", "--sleep", "60", "--child-sleep", "60",
                                         timeout=2)])
    assert jobs["slow"].state is JobState.FAILED
    assert "timed out after 2 s; killed" in jobs["slow"].error
    wait_for(lambda: job_processes("slow") == [], 10, "the timed-out job's processes gone")

    run = submit([probe("cancelled", "--sleep", "60", "--child-sleep", "60")], output_dir="w",
                 workdir=warm_cluster.workdir, broker_url=warm_cluster.broker_url)
    wait_for(lambda: len(job_processes("cancelled")) >= 2, 30, "the job and its child to run")
    run.cancel()
    wait_for(lambda: job_processes("cancelled") == [], 5, "the cancelled job's processes gone")
    assert run.wait(timeout=30).jobs[0].state is JobState.CANCELLED


def test_a_killed_worker_takes_its_warm_job_and_a_failed_preload_runs_jobs_cold(
        redis_server: RedisServer, tmp_path: Path) -> None:
    with LocalCluster([ALONE], scripts_dir=REPO, workdir=tmp_path, broker_url=redis_server.url,
                      extra_env={"SC_WARM": "1", "SC_PRELOAD": "json"}) as cluster:
        run = submit([probe("orphan", "--sleep", "60", "--child-sleep", "60", node=ALONE)],
                     output_dir="w", workdir=tmp_path, broker_url=redis_server.url)
        main = cluster.workers[ALONE].pid
        # The pool process that waits for the job dies: the runner sees its connection close.
        wait_for(lambda: len(job_processes("orphan")) >= 2, 30, "the job and its child to run")
        first = job_processes("orphan")
        os.kill(pool_process(main), signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in first), 15, "the job's processes gone")
        # Celery gives the lost job back (reject on worker lost); SIGKILL to the worker's main
        # process alone: its zygote, the job's runner, the script and its child go through
        # their death signals.
        wait_for(lambda: len(job_processes("orphan")) >= 2, 30, "the job to run again")
        again = job_processes("orphan")
        os.kill(main, signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in again), 15, "the job's processes gone")
        run.cancel()
    with LocalCluster([ALONE], scripts_dir=REPO, workdir=tmp_path, broker_url=redis_server.url,
                      log_dir=tmp_path / "failed-preload",
                      extra_env={"SC_WARM": "1", "SC_PRELOAD": "json,no_such_module"}
                      ) as cluster:
        jobs = run_jobs(cluster, [probe("cold_anyway", node=ALONE)])
        worker_log = (cluster.log_dir / f"worker-{ALONE}.log").read_text()
    assert jobs["cold_anyway"].state is JobState.SUCCEEDED
    assert not report(cluster, "cold_anyway")["warm"]
    # Two lines, in either order: the preload's failure, and the bare zygote ready.
    lines = sorted((line for line in worker_log.splitlines() if "warm:" in line),
                   key=lambda line: "warm: bare zygote" in line)
    assert len(lines) == 2 and lines[0].endswith(
        "warm: preload no_such_module failed: ModuleNotFoundError: No module named "
        "'no_such_module'; jobs run cold"), lines
    assert "warm: bare zygote pid" in lines[1] and lines[1].endswith("preloaded nothing")
    assert "not warm: the zygote did not answer" in log_of(cluster, "cold_anyway")


def test_a_zygote_that_dies_is_restarted_saying_so(warm_cluster: LocalCluster) -> None:
    log = warm_cluster.log_dir / f"worker-{NODE}.log"
    zygote = zygote_of(warm_cluster)
    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: f"warm: the zygote (pid {zygote}) died" in log.read_text(), 15,
             "the restart line")
    wait_for(lambda: log.read_text().split(f"(pid {zygote}) died", 1)[1].count(
        "warm: zygote pid") == 1, 30, "the new zygote ready")
    jobs = run_jobs(warm_cluster, [probe("after_restart")])
    assert jobs["after_restart"].state is JobState.SUCCEEDED
    assert report(warm_cluster, "after_restart")["warm"]


def zygote_of(cluster: LocalCluster, node: str = NODE, name: str = "zygote") -> int:
    """The pid of the node's zygote (``name``: or its bare one), from its worker's last
    report."""
    log = cluster.log_dir / f"worker-{node}.log"
    wait_for(lambda: f"warm: {name} pid" in log.read_text(), 30, f"the {name} ready")
    return int(next(line for line in reversed(log.read_text().splitlines())
                    if f"warm: {name} pid" in line).split("zygote pid ")[1].split()[0])


def test_a_script_that_cannot_use_the_preload_is_forked_from_the_bare_zygote(
        warm_cluster: LocalCluster) -> None:
    # Forking a large preload costs each job in proportion to its size: a script that imports
    # only the standard library, none of it preloaded, pays nothing for it.
    bare = {"job_id": "bare", "script": "tests/bare_probe.py", "node": NODE,
            "args": ["--output-file", "w/bare.json"]}
    jobs = run_jobs(warm_cluster, [bare, probe("preloaded")])
    assert {job.state for job in jobs.values()} == {JobState.SUCCEEDED}, jobs
    forked = json.loads((warm_cluster.workdir / "w" / "bare.json").read_text())
    assert forked == {"warm": True, "preloaded": False,
                      "zygote": zygote_of(warm_cluster, name="bare zygote")}
    assert report(warm_cluster, "preloaded")["colorsys_loaded"]
    assert "not warm" not in log_of(warm_cluster, "bare")


def live_children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(child) for child in found if alive(int(child))]


def spare_of(zygote: int) -> tuple[int, int] | None:
    """The zygote's spare: a runner with its script's process waiting under it, no job yet
    (its name is still the zygote's)."""
    for runner in live_children(zygote):
        waiting = live_children(runner)
        with contextlib.suppress(OSError):
            if len(waiting) == 1 and Path(f"/proc/{runner}/comm").read_text().strip() != \
                    WARM_JOB_NAME:
                return runner, waiting[0]
    return None


def test_a_script_that_sets_an_import_time_variable_imports_the_preload_itself(
        warm_cluster: LocalCluster) -> None:
    # os.environ["OMP_NUM_THREADS"] = "1" before import numpy: a zygote that had NumPy
    # loaded would ignore it. Such a script is forked from the bare zygote.
    job = {"job_id": "threads", "script": "tests/threads_probe.py", "node": NODE,
           "args": ["--output-file", "w/threads.json"]}
    assert run_jobs(warm_cluster, [job])["threads"].state is JobState.SUCCEEDED
    seen = json.loads((warm_cluster.workdir / "w" / "threads.json").read_text())
    assert seen == {"imported_before": False, "warm": True}


def test_a_spare_killed_while_it_waits_is_replaced(warm_cluster: LocalCluster) -> None:
    # The next job's runner and script process are forked ahead, so no fork of the zygote
    # lies on a job's path; whoever kills them meanwhile costs the next job only that fork.
    zygote = zygote_of(warm_cluster)
    # Each job's pool process reserves the next job's spare as the job starts.
    assert run_jobs(warm_cluster, [probe("before")])["before"].state is JobState.SUCCEEDED
    spare: list[tuple[int, int]] = []
    wait_for(lambda: spare.append(spare_of(zygote)) or spare[-1] is not None, 15,
             "the zygote's spare runner and its waiting script process")
    runner, script = spare[-1]
    os.kill(script, signal.SIGKILL)
    jobs = run_jobs(warm_cluster, [probe("after_script_killed")])
    assert jobs["after_script_killed"].state is JobState.SUCCEEDED
    assert report(warm_cluster, "after_script_killed")["warm"]
    # It ran under the spare found waiting: handed straight to it, not through the zygote.
    ran = json.loads((warm_cluster.workdir / "w" / "after_script_killed.json").read_text())
    assert ran["runner"] == runner
    wait_for(lambda: not alive(runner), 15, "the spare that ran it gone")
    spare.clear()
    wait_for(lambda: spare.append(spare_of(zygote)) or spare[-1] is not None, 15,
             "the next spare")
    runner, script = spare[-1]
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: not alive(script), 15, "the killed runner's waiting process gone")
    jobs = run_jobs(warm_cluster, [probe("after_runner_killed")])
    assert jobs["after_runner_killed"].state is JobState.SUCCEEDED
    assert report(warm_cluster, "after_runner_killed")["warm"]
    assert "not warm" not in log_of(warm_cluster, "after_runner_killed")


def test_step3_on_a_warm_worker_scores_with_the_engine_loaded_ahead(
        redis_server: RedisServer, tmp_path: Path) -> None:
    # 300,000 seeds x 100 draws: 3*10^7 steps, where the compiled engine wins once loaded,
    # but not by enough to pay for loading it in a fresh process (10^8).
    made = run_cli("demo-data", "--out-dir", "d", "--candidates", "300000", "--draws", "100",
                   cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    args = ["--seeds-file", "d/survivors.json", "--train-history", "d/train_history.json",
            "--prng-type", "java_lcg", "--mod", "1000"]
    chunks = [{"job_id": f"chunk_{mode}", "script": "full_scoring_worker.py", "node": ALONE,
               "args": [*args, "--output-file", f"w/chunk_{mode}.json"],
               "warm": mode == "warm"} for mode in ("warm", "cold")]
    # The default preload: the Step 3 script's engines (the suite sets a light one).
    with LocalCluster([ALONE], scripts_dir=REPO, workdir=tmp_path, broker_url=redis_server.url,
                      extra_env={"SC_WARM": "1", PRELOAD_VARIABLE: ",".join(DEFAULT_PRELOAD)}
                      ) as cluster:
        jobs = run_jobs(cluster, chunks)
        worker_log = (cluster.log_dir / f"worker-{ALONE}.log").read_text()
    assert {job.state for job in jobs.values()} == {JobState.SUCCEEDED}, jobs
    assert "preloaded numpy, scoring.warm_engines" in worker_log
    engines = {mode: next(line for line in log_of(cluster, f"chunk_{mode}").splitlines()
                          if line.startswith("backend:")) for mode in ("warm", "cold")}
    assert engines["warm"].endswith("engine for this file: compiled)"), engines
    assert engines["cold"].endswith("engine for this file: vectorized)"), engines
    scores = {mode: json.loads((tmp_path / "w" / f"chunk_{mode}.json").read_text())
              for mode in ("warm", "cold")}
    assert scores["warm"]["results"] == scores["cold"]["results"]


def test_worker_warm_flags(redis_server: RedisServer, tmp_path: Path) -> None:
    args = ["worker", "--node", ALONE, "--workdir", str(tmp_path), "--broker", redis_server.url]
    cold = run_cli(*args, "--cold", "--preload", "json", "--detach")
    assert cold.returncode == 2 and "--preload: not with --cold" in cold.stderr
    both = run_cli(*args, "--cold", "--warm", "--detach")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    bad = run_cli(*args, "--warm", "--preload", "json,not-a-module", "--detach")
    assert bad.returncode == 2 and "'not-a-module' is not a module name" in bad.stderr
    try:
        # Warm by default: no --warm needed.
        started = run_cli(*args, "--preload", "json", "--detach")
        assert started.returncode == 0, started.stderr
        log = tmp_path / ".scripts-coordinator" / f"worker-{ALONE}.log"
        wait_for(lambda: "warm: zygote pid" in log.read_text(), 30, "the zygote ready")
        assert "preloaded json" in log.read_text()
        # A warm stop lets the running warm job finish (the zygote goes after it).
        run = submit([probe("finishes", "--sleep", "3", node=ALONE)], output_dir="w",
                     workdir=tmp_path, broker_url=redis_server.url)
        wait_for(lambda: run.status().jobs[0].state is JobState.RUNNING, 30, "the job to run")
        # ps names the warm script by its own command line, as a cold start's would.
        wait_for(lambda: any(b"tests/warm_probe.py --output-file w/finishes.json" in
                             Path(f"/proc/{pid}/cmdline").read_bytes()
                             for pid in job_processes("finishes")), 10,
                 "the warm script titled with its command line")
        stopped = run_cli(*args, "--stop")
        assert "(warm: its running job finished first)" in stopped.stdout, stopped.stdout
        assert run.status().jobs[0].state is JobState.SUCCEEDED
    finally:
        run_cli(*args, "--stop", "--now")


@pytest.mark.parametrize(("flags", "warm"), [((), True), (("--cold",), False)])
def test_local_runs_jobs_warm_by_default_and_cold_with_cold(
        tmp_path: Path, flags: tuple[str, ...], warm: bool) -> None:
    assert run_cli("examples", str(tmp_path)).returncode == 0
    done = run_cli("local", "--jobs-file", "examples/hello_jobs.json", "--output-dir", "out",
                   *flags, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    logs = "".join(path.read_text() for path in (tmp_path / "out" / "logs").glob("worker-*"))
    assert ("warm: zygote pid" in logs) is warm, logs[-2000:]


WATCHDOG_PROBE = '''
import json, os, sys, tempfile, time
from pathlib import Path
from worker_tasks import shutdown, warm

def until(check, what, seconds=30):
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)

zygote = warm.Supervisor(["json"], dict(os.environ))
zygote.start()
until(lambda: os.path.exists(zygote.socket_path), "the zygote")
work = Path(tempfile.mkdtemp())
(work / "job.py").write_text("import time; time.sleep(2)\\n")
warm.reservations.ask(zygote.socket_path)
until(lambda: len(shutdown.parents()) and any(
    shutdown.parents().get(pid) == zygote.process.pid for pid in shutdown.parents()), "a spare")
seen = {"spares_only": shutdown.job_running()}
job = warm.WarmRunner(zygote.socket_path, [sys.executable, str(work / "job.py")], work,
                      {"PATH": os.environ["PATH"]}, work / "log")
until(shutdown.job_running, "the warm job counted")
seen["job_ended"] = job.wait(30).exit_code
until(lambda: not shutdown.job_running(), "the job no longer counted")
zygote.stop()
print(json.dumps(seen))
'''


def test_a_stopping_worker_waits_for_its_warm_jobs_not_for_its_spares(tmp_path: Path) -> None:
    # A worker whose broker is gone exits on its own once no job runs: a zygote's spare
    # runners, always there, are no job; a warm job's runner is one while it runs.
    probe_run = subprocess.run([sys.executable, "-c", WATCHDOG_PROBE], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert probe_run.returncode == 0, probe_run.stderr
    assert json.loads(probe_run.stdout.splitlines()[-1]) == {"spares_only": False,
                                                             "job_ended": 0}


ZIPAPP_PROBE = '''
import json, os, sys, tempfile, time, zipapp
from pathlib import Path
from worker_tasks import warm

work = Path(tempfile.mkdtemp())
(work / "app").mkdir()
(work / "app" / "__main__.py").write_text(
    "import sys\\nopen(sys.argv[1], 'w').write(f'{__name__} {sys.argv[1:]}')\\n")
zipapp.create_archive(work / "app", work / "app.pyz")
zygote = warm.Supervisor([], dict(os.environ), name="bare zygote")
zygote.start()
deadline = time.monotonic() + 30
while not os.path.exists(zygote.socket_path) and time.monotonic() < deadline:
    time.sleep(0.05)
job = warm.WarmRunner(zygote.socket_path, [sys.executable, str(work / "app.pyz"), "warm.txt"],
                      work, {"PATH": os.environ["PATH"]}, work / "log")
ended = job.wait(30)
zygote.stop()
cold = __import__("subprocess").run([sys.executable, str(work / "app.pyz"), "cold.txt"],
                                    cwd=work)
print(json.dumps({"warm": [ended.exit_code, (work / "warm.txt").read_text()],
                  "cold": [cold.returncode, (work / "cold.txt").read_text()]}))
'''


def test_a_zip_application_runs_warm_as_python_runs_it() -> None:
    # ``python app.pyz`` runs the archive's __main__.py: so does a warm job of it.
    probe_run = subprocess.run([sys.executable, "-c", ZIPAPP_PROBE], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert probe_run.returncode == 0, probe_run.stderr
    seen = json.loads(probe_run.stdout.splitlines()[-1])
    assert seen == {"warm": [0, "__main__ ['warm.txt']"], "cold": [0, "__main__ ['cold.txt']"]}
