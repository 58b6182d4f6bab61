"""Shared fixtures: a real redis-server and a real local cluster, started by the suite.

Helpers that tests import (commands, jobs) live in ``tests/helpers.py``, waiting in
``tests/waiting.py``.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer
from tests.helpers import NODES, REPO
from worker_tasks.signing import KEYS_DIR_VARIABLE

# The external references, by the fixture that brings each one in: the summary line at the
# end of a run says how many of their tests passed (CI's proof that they ran, not skipped).
REFERENCE_FIXTURES = {"java_draws": "Java (java.util.Random)",
                      "cpp_draws": "C++ (std engines, xorshift32)",
                      "compiler": "C++ (CUDA kernel harness)",
                      "ssh_cluster": "SSH (real sshd hosts)",
                      "ssh_hosts": "SSH (real sshd hosts)"}
_reference_passes: dict[str, int] = dict.fromkeys(REFERENCE_FIXTURES.values(), 0)


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM stops the suite as Ctrl-C does: pytest ends the run and every fixture's
    # teardown stops what it started (servers, workers). Without this, SIGTERM kills
    # pytest where it stands and the session's workers live on.
    signal.signal(signal.SIGTERM, _interrupt)
    # No head key of the user's (~/.config) signs the suite's jobs, and none the suite
    # makes (cluster init) outlives the test that made it (see ``own_keys_dir``).
    os.environ[KEYS_DIR_VARIABLE] = tempfile.mkdtemp(prefix="sc-test-keys-")


@pytest.fixture(autouse=True)
def own_keys_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own (empty) head keys directory: a cluster init makes its key there."""
    monkeypatch.setenv(KEYS_DIR_VARIABLE, str(tmp_path / "head-keys"))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Runs where the test ran (an xdist worker): the report carries which references the
    # test used to wherever reports are counted (the controller).
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        report.user_properties.extend(
            ("reference", reference) for fixture, reference in REFERENCE_FIXTURES.items()
            if fixture in getattr(item, "fixturenames", ()))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        for name, value in report.user_properties:
            if name == "reference":
                _reference_passes[value] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not terminalreporter.stats.get("passed"):
        return  # nothing ran (--collect-only, or every test failed)
    ran = ", ".join(f"{name} {count} passed" for name, count in _reference_passes.items())
    terminalreporter.write_line(f"external references: {ran}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    # die_with_parent: a pytest killed outright (SIGKILL) takes its servers with it too.
    with RedisServer(die_with_parent=True) as server:
        yield server


@pytest.fixture(scope="session")
def cluster_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-work")


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer, cluster_workdir: Path) -> Iterator[LocalCluster]:
    """Four real Celery workers (rig-a..rig-d) on the suite's Redis; scripts from the repo."""
    with LocalCluster(NODES, scripts_dir=REPO, workdir=cluster_workdir,
                      log_dir=cluster_workdir / "worker-logs",
                      broker_url=redis_server.url, die_with_parent=True) as running:
        yield running


@pytest.fixture()
def client(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)
