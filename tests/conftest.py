"""Shared fixtures: a real redis-server and a real local cluster, started by the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODES = ["rig-a", "rig-b", "rig-c", "rig-d"]
# Bound on any command a test runs (seconds).
COMMAND_TIMEOUT_S = 240
# The external references, by the fixture that brings each one in: the summary line at the
# end of a run says how many of their tests passed (CI's proof that they ran, not skipped).
REFERENCE_FIXTURES = {"java_draws": "Java (java.util.Random)",
                      "cpp_draws": "C++ (std engines, xorshift32)",
                      "compiler": "C++ (CUDA kernel harness)",
                      "ssh_cluster": "SSH (real sshd hosts)"}
_reference_passes: dict[str, int] = dict.fromkeys(REFERENCE_FIXTURES.values(), 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed:
        for fixture, reference in REFERENCE_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                _reference_passes[reference] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not terminalreporter.stats.get("passed"):
        return  # nothing ran (--collect-only, or every test failed)
    ran = ", ".join(f"{name} {count} passed" for name, count in _reference_passes.items())
    terminalreporter.write_line(f"external references: {ran}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def cluster_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-work")


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer, cluster_workdir: Path) -> Iterator[LocalCluster]:
    """Four real Celery workers (rig-a..rig-d) on the suite's Redis; scripts from the repo."""
    with LocalCluster(NODES, scripts_dir=REPO, workdir=cluster_workdir,
                      log_dir=cluster_workdir / "worker-logs",
                      broker_url=redis_server.url) as running:
        yield running


@pytest.fixture()
def client(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def run_cli(*args: str, tool: str = "coordinator", cwd: Path | None = None,
            env: dict[str, str] | None = None,
            timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run an installed console script as a user would; output captured as text."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(BIN / tool), *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(jobs), encoding="utf-8")
    return path


def echo_job(job_id: str, node: str, out: str = "anywhere", *extra: Any,
             gpu_id: int = 0) -> dict[str, Any]:
    """A job of examples/write_output.py writing ``<out>/<job_id>.json``."""
    return {"job_id": job_id, "script": "examples/write_output.py",
            "args": ["--output-file", f"{out}/{job_id}.json", *extra],
            "node": node, "gpu_id": gpu_id}


def queue_lengths(client: redis.Redis, nodes: list[str] = NODES) -> dict[str, int]:
    return {node: int(client.llen(f"node.{node}")) for node in nodes}
