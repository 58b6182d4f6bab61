"""docs/python-api.md's first example, run as written from an empty directory (issue 32):
``local --up``, the Python API with no broker named, ``local --down`` leaving nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import BIN, REPO, run_cli
from tests.waiting import alive, wait_for

PAGE = REPO / "docs" / "python-api.md"


def blocks(language: str) -> list[str]:
    text = PAGE.read_text(encoding="utf-8")
    return [part.split("```", 1)[0] for part in text.split(f"```{language}\n")[1:]]


def newcomer(tmp_path: Path, name: str) -> tuple[Path, Path, dict[str, str]]:
    """An empty directory, the local-cluster state file's place (each test its own), and an
    environment with no SC_* variable but that one: no broker is named."""
    work = tmp_path / name
    work.mkdir()
    state = tmp_path / "state" / "local-cluster.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("SC_")}
    env.update(SC_LOCAL_STATE=str(state), PATH=f"{BIN}:{env.get('PATH', '')}")
    return work, state, env


def test_the_python_api_page_runs_as_written_from_an_empty_directory(tmp_path: Path) -> None:
    up_block, down_block = blocks("bash")[:2]
    (python_block,) = blocks("python")[:1]
    work, state, env = newcomer(tmp_path, "empty")
    try:
        for line in up_block.splitlines():
            command = line.split("#", 1)[0].strip()
            done = subprocess.run(command, shell=True, cwd=work, env=env, text=True,
                                  capture_output=True, timeout=180, check=False)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
        cluster = json.loads(state.read_text())
        # Where a command with no broker named goes, asked without connecting: anywhere but
        # the cluster that is up would be this machine's own Redis, which no test touches.
        resolved = subprocess.run([sys.executable, "-c", "from coordinator.broker import "
                                   "broker_url; print(broker_url())"], cwd=work, env=env,
                                  text=True, capture_output=True, timeout=60, check=False)
        assert resolved.stdout.strip() == cluster["broker_url"], resolved.stdout + resolved.stderr
        ran = subprocess.run([sys.executable, "-c", python_block], cwd=work, env=env, text=True,
                             capture_output=True, timeout=300, check=False)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.splitlines()[-1] == "4/4 succeeded; failed: []", ran.stdout
        assert ran.stderr.count("using the local cluster at ") == 1, ran.stderr  # said once
        assert (work / "out" / "run_summary.json").exists()
        status = run_cli("local", "--status", cwd=work, env=env)
        assert status.returncode == 0 and cluster["broker_url"] in status.stdout
        # local --jobs-file submits to the cluster that is up instead of a throwaway one.
        local = run_cli("local", "--jobs-file", "examples/hello_jobs.json", "--output-dir",
                        "out2", cwd=work, env=env)
        assert local.returncode == 0, local.stdout + local.stderr
        assert (f"jobs published to the local cluster that is up ({cluster['broker_url']})"
                in local.stderr)
        # So does submit --wait, with no broker named.
        waited = run_cli("submit", "--jobs-file", "examples/hello_jobs.json", "--output-dir",
                         "out3", "--wait", cwd=work, env=env)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert (work / "out3" / "run_summary.json").exists()
    finally:
        down = subprocess.run(down_block.split("#", 1)[0].strip(), shell=True, cwd=work,
                              env=env, text=True, capture_output=True, timeout=120, check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.startswith("stopped the local cluster"), down.stdout
    wait_for(lambda: not any(alive(pid) for pid in [cluster["pid"], *cluster["processes"]]), 30,
             "every process of the local cluster to end")
    assert not state.parent.exists()  # its state, its log and the workers' logs
    assert run_cli("local", "--status", cwd=work, env=env).returncode == 6


def test_the_pipeline_example_queues_three_steps_and_leaves(tmp_path: Path) -> None:
    """examples/pipeline.sh against a local cluster that is up: it returns once the three
    runs are queued; they then run one after the other with nobody following them."""
    work, _, env = newcomer(tmp_path, "work")
    try:
        up = run_cli("local", "--up", "--scripts-dir", str(work), cwd=work, env=env,
                     timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        queued = subprocess.run(["bash", str(REPO / "examples" / "pipeline.sh")], cwd=work,
                                env=env, text=True, capture_output=True, timeout=180,
                                check=False)
        assert queued.returncode == 0, queued.stdout + queued.stderr
        step3, step5, step6 = re.findall(r"run (\d{8}-\d{6}-[0-9a-f]+)",
                                         queued.stdout.splitlines()[-2])
        runs = run_cli("runs", cwd=work, env=env).stdout
        assert f"{step6}" in runs
        waited = run_cli("wait", step6, cwd=work, env=env, timeout=300)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert json.loads((work / "step6" / "prediction.json").read_text())
        assert (work / "step5" / "best.json").exists()
        summary = json.loads(run_cli("status", step5, "--json", cwd=work, env=env).stdout)
        first_start = min(job["started_at"] for job in summary["jobs"])
        step3_status = json.loads(run_cli("status", step3, "--json", cwd=work, env=env).stdout)
        assert step3_status["outcome"] == "finished"
        assert first_start >= max(job["finished_at"] for job in step3_status["jobs"])
    finally:
        run_cli("local", "--down", cwd=work, env=env, timeout=120)
