"""Migration without edits: the pipeline's own command lines, run through the shims.

A temporary directory is made the way a pipeline directory looks (survivors,
history, jobs files, and the two files `coordinator shims` writes); the
pipeline's exact lines (`python3 scripts_coordinator.py ...`,
`python3 coordinator_adapter.py ...`) run there with the system's python3,
which does not have the project: the shims hand over to the interpreter that
has it. A local cluster (real Redis, real workers, the directory as workdir)
runs the jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer
from coordinator.shims import SHIMS, render
from tests.helpers import BIN, REPO, run_cli, write_jobs

# The pipeline's python3: the system's, without this project (the shims hand over).
SYSTEM_PYTHON3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A pipeline directory with its shims, and a local cluster working in it."""
    directory = tmp_path_factory.mktemp("pipeline")
    result = run_cli("shims", str(directory))
    assert result.returncode == 0, result.stderr
    assert run_cli("demo-data", "--out-dir", str(directory), "--candidates", "30000",
                   "--draws", "60", "--secret-seed", "987654321").returncode == 0
    with RedisServer() as server, LocalCluster(["rig-a", "rig-b"], scripts_dir=REPO,
                                               workdir=directory,
                                               log_dir=directory / "worker-logs",
                                               broker_url=server.url):
        yield directory, server.url


def pipeline_line(directory: Path, broker: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """A line of the pipeline's shell scripts, run as they run it: PATH with the system first."""
    env = {**os.environ, "SC_BROKER_URL": broker,
           "PATH": f"/usr/local/bin:/usr/bin:/bin:{BIN}"}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(list(argv), cwd=directory, env=env, text=True, capture_output=True,
                          timeout=300, check=False)


def test_the_shims_in_the_repository_are_the_template() -> None:
    for name in SHIMS:
        assert (REPO / name).read_text() == render(name), f"{name}: run the shims generator"
        assert os.access(REPO / name, os.X_OK)


def test_the_system_python3_lacks_the_project_so_the_handover_is_exercised() -> None:
    probe = subprocess.run([SYSTEM_PYTHON3, "-c", "import celery"], capture_output=True,
                           check=False, cwd="/", timeout=60)
    # A python3 that has the project would run the shims directly, and the handover this
    # file relies on would go untested: make that a failure, not a quiet pass.
    assert probe.returncode != 0, f"{SYSTEM_PYTHON3} has celery: the handover is not exercised"


def test_step3_shell_script_runs_unchanged(pipeline: tuple[Path, str]) -> None:
    directory, broker = pipeline
    script = REPO / "examples" / "run_step3_full_scoring.sh"
    result = pipeline_line(directory, broker, "bash", str(script), "rig-a,rig-b:2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "36/36 succeeded" in result.stdout
    assert "step 3 done: next, step 5 with --survivors" in result.stdout
    out = directory / "full_scoring_results"
    assert len(list(out.glob("chunk_*.json.done"))) == 36
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["succeeded"] == 36
    # Step 5 reads the merged file the way a consumer does.
    read = pipeline_line(directory, broker, sys.executable,
                         str(REPO / "examples" / "step5_read_survivors.py"), "--survivors",
                         str(out / "survivors_with_scores.json"), "--top", "3")
    assert read.returncode == 0, read.stderr
    best = [json.loads(line) for line in read.stdout.splitlines()]
    assert best[0]["seed"] == 987654321 and best[0]["score"] == 1.0
    assert len(best) == 3 and best[0]["prng_type"] == "java_lcg"


def test_step5_with_preserve_paths_writes_per_trial_paths(pipeline: tuple[Path, str]) -> None:
    directory, broker = pipeline
    jobs = [{"job_id": f"trial_{trial}_fold_{fold}", "script": "examples/write_output.py",
             "args": ["--output-file", f"trials/trial_{trial}/fold_{fold}.json", "--fold",
                      fold], "node": ("rig-a", "rig-b")[fold % 2]}
            for trial in ("a", "b") for fold in range(3)]
    write_jobs(directory / "anti_overfit_jobs.json", jobs)
    script = REPO / "examples" / "run_step5_anti_overfit.sh"
    result = pipeline_line(directory, broker, "bash", str(script))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "6/6 succeeded" in result.stdout
    for job in jobs:
        output = directory / job["args"][1]
        assert output.is_file() and Path(f"{output}.done").is_file()
    assert (directory / "anti_overfit_results" / "run_summary.json").is_file()
    assert not (directory / "anti_overfit_results" / "trial_a").exists()  # not rewritten


def test_the_adapter_routes_legacy_and_script_jobs_and_runs_them(
        pipeline: tuple[Path, str]) -> None:
    directory, broker = pipeline
    seeds = [987654321, 1, 2, 3, 5, 8]
    mixed = [{"job_id": "legacy_one", "seeds": seeds[:3], "prng_type": "java_lcg",
              "mod": 1000, "train_history": "train_history.json", "node": "rig-a"},
             {"seeds": seeds[3:], "prng_type": "java_lcg", "mod": 1000,
              "train_history": "train_history.json", "node": "rig-b"},
             {"job_id": "plain", "script": "examples/write_output.py",
              "args": ["--output-file", "anywhere/plain.json"], "node": "rig-b"}]
    write_jobs(directory / "mixed_jobs.json", mixed)
    result = pipeline_line(directory, broker, SYSTEM_PYTHON3, "coordinator_adapter.py",
                           "--jobs-file", "mixed_jobs.json", "--output-dir", "adapter_results")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    routes = [line for line in result.stdout.splitlines() if line.startswith("route ")]
    assert routes == [
        "route legacy_one: legacy scoring job (inline seeds) -> full_scoring_worker.py on rig-a,"
        " seeds in scoring_chunks/legacy_one.json",
        "route legacy_0001: legacy scoring job (inline seeds) -> full_scoring_worker.py on "
        "rig-b, seeds in scoring_chunks/legacy_0001.json",
        "route plain: script job -> examples/write_output.py on rig-b"]
    assert "3/3 succeeded" in result.stdout
    out = directory / "adapter_results"
    assert sorted(path.name for path in out.glob("*.done")) == [
        "legacy_0001.json.done", "legacy_one.json.done", "plain.json.done"]
    merged = json.loads((out / "survivors_with_scores.json").read_text())
    assert [record["seed"] for record in merged["results"]][0] == 987654321
    assert sorted(record["seed"] for record in merged["results"]) == sorted(seeds)


def test_the_legacy_format_alone_through_the_adapter_and_a_dry_run(
        pipeline: tuple[Path, str]) -> None:
    directory, broker = pipeline
    legacy = [{"seeds": [11, 987654321, 13], "prng_type": "java_lcg", "mod": 1000,
               "train_history": "train_history.json", "node": "rig-b"}]
    write_jobs(directory / "legacy_jobs.json", legacy)
    dry = pipeline_line(directory, broker, SYSTEM_PYTHON3, "scripts_coordinator.py",
                        "--jobs-file", "legacy_jobs.json", "--output-dir", "legacy_results",
                        "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "legacy job 0 (legacy_0000): 3 inline seeds -> scoring_chunks/legacy_0000.json" \
        in dry.stdout
    assert "dry run: nothing published" in dry.stdout
    assert not (directory / "legacy_results").exists()
    result = pipeline_line(directory, broker, SYSTEM_PYTHON3, "coordinator_adapter.py",
                           "--jobs-file", "legacy_jobs.json", "--output-dir", "legacy_results")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    merged = json.loads((directory / "legacy_results" / "survivors_with_scores.json").read_text())
    assert merged["results"][0]["seed"] == 987654321 and merged["n_seeds"] == 3


def test_a_failing_job_makes_the_pipeline_line_exit_1(pipeline: tuple[Path, str]) -> None:
    directory, broker = pipeline
    write_jobs(directory / "failing.json", [
        {"job_id": "bad", "script": "examples/write_output.py",
         "args": ["--output-file", "f/bad.json", "--exit-code", "3"], "node": "rig-a"}])
    result = pipeline_line(directory, broker, SYSTEM_PYTHON3, "scripts_coordinator.py",
                           "--jobs-file", "failing.json", "--output-dir", "failing_results")
    assert result.returncode == 1
    assert "0/1 succeeded" in result.stdout and "FAILED bad on rig-a" in result.stdout
