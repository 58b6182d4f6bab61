"""Shared fixtures: a real redis-server and a real local cluster, started by the suite.

Helpers that tests import (commands, jobs) live in ``tests/helpers.py``, waiting in
``tests/waiting.py``.

The suite runs its tests side by side (pytest-xdist, ``-n 4`` in README command 2): every
server a test starts takes a free port, and every directory is the test's own. A test
marked ``alone`` runs while no other test runs (``SideBySide``), and the longest files are
handed out first, so the run does not end waiting on one of them; ``alone`` tests last.
"""

from __future__ import annotations

import fcntl
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
from coordinator.standing import STATE_VARIABLE
from tests.helpers import NODES, REPO
from worker_tasks.signing import KEYS_DIR_VARIABLE
from worker_tasks.warm import PRELOAD_VARIABLE

# The external references, by the fixture that brings each one in: the summary line at the
# end of a run says how many of their tests passed (CI's proof that they ran, not skipped).
REFERENCE_FIXTURES = {"java_draws": "Java (java.util.Random)",
                      "cpp_draws": "C++ (std engines, xorshift32)",
                      "compiler": "C++ (CUDA kernel harness)",
                      "ssh_cluster": "SSH (real sshd hosts)",
                      "ssh_hosts": "SSH (real sshd hosts)"}
_reference_passes: dict[str, int] = dict.fromkeys(REFERENCE_FIXTURES.values(), 0)


# The longest tests (``--durations=30``, side by side), then the files whose tests take
# longest: handed out first when tests run side by side, so that no process is left with
# one of them at the end.
LONGEST_TESTS = (
    "test_soak_1000_jobs_with_retries_worker_kills_and_a_broker_crash",
    "test_the_cluster_section_runs_as_written_from_an_empty_head_directory",
    "test_a_failover_while_a_run_is_published_loses_no_job",
    "test_step3_over_ssh_from_init_to_down",
    "test_each_run_command_reaches_each_status_it_lists",
    "test_the_python_api_cancels_retries_reports_progress",
    "test_deploy_project_installs_this_build_with_the_nodes_python",
    "test_a_run_completes_when_its_master_dies_for_good",
)
LONGEST_FIRST = ("test_ssh_cluster.py", "test_failover.py", "test_reliability.py",
                 "test_warm.py", "test_per_gpu_workers.py", "test_promises.py",
                 "test_placement.py", "test_faults.py", "test_signing.py")


def pytest_configure(config: pytest.Config) -> None:
    if side_by_side(config) and getattr(config.option, "maxschedchunk", None) is None:
        # One test at a time to whichever process is free, in the order below: xdist's
        # default hands each process a run of consecutive tests first, which would give
        # every one of the longest tests to the same process.
        config.option.maxschedchunk = 1
    config.addinivalue_line(
        "markers", "alone: runs while no other test runs (it watches the whole machine, or "
                   "the whole machine's load would change what it measures)")
    # SIGTERM stops the suite as Ctrl-C does: pytest ends the run and every fixture's
    # teardown stops what it started (servers, workers). Without this, SIGTERM kills
    # pytest where it stands and the session's workers live on.
    signal.signal(signal.SIGTERM, _interrupt)
    # No head key of the user's (~/.config) signs the suite's jobs, and none the suite
    # makes (cluster init) outlives the test that made it (see ``own_keys_dir``).
    # Workers the suite starts run warm, as by default, but their zygotes import json only:
    # NumPy and Numba in each of them cost the suite about a CPU second a worker. The
    # default preload has its own test (test_warm's Step 3 on a warm worker).
    os.environ.setdefault(PRELOAD_VARIABLE, "json")
    os.environ[KEYS_DIR_VARIABLE] = tempfile.mkdtemp(prefix="sc-test-keys-")
    os.environ[STATE_VARIABLE] = str(Path(tempfile.mkdtemp(prefix="sc-test-state-")) / "local.json")


@pytest.fixture(autouse=True)
def own_keys_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own (empty) head keys directory: a cluster init makes its key there; and
    its own local-cluster state file: no cluster a user keeps up (local --up) is used."""
    monkeypatch.setenv(KEYS_DIR_VARIABLE, str(tmp_path / "head-keys"))
    monkeypatch.setenv(STATE_VARIABLE, str(tmp_path / "local-state" / "local-cluster.json"))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not side_by_side(config):
        return
    longest = {name: place for place, name in enumerate(LONGEST_TESTS)}
    files = {name: place for place, name in enumerate(LONGEST_FIRST)}
    # Tests that run alone go last: queued earlier, one would hold every worker idle until
    # the longest test then running ends.
    items.sort(key=lambda item: (item.get_closest_marker("alone") is not None,
                                 longest.get(item.name, len(longest)),
                                 files.get(item.path.name, len(files))))  # stable within a file
    # xdist first hands each of its N processes two tests in a row: the N longest go one to
    # each process, each followed by one of the next N.
    count = int(getattr(config.option, "numprocesses", 0) or 0)
    head = items[:2 * count]
    if count and len(head) == 2 * count:
        items[:2 * count] = [head[index] for pair in zip(range(count), range(count, 2 * count),
                                                         strict=True) for index in pair]


def side_by_side(config: pytest.Config) -> bool:
    """Tests run in several processes (pytest-xdist's ``-n N``, N > 0)."""
    return bool(getattr(config.option, "numprocesses", None)) or hasattr(config, "workerinput")


class SideBySide:
    """A readers-writer lock over a file that every test process of the run shares.

    Each test holds it shared while it runs; a test marked ``alone`` holds it exclusive.
    A turnstile in front keeps an ``alone`` test from waiting for ever behind a stream of
    shared holders: once it queues there, no new test starts until it has run.

    Parameters:
        directory: a directory every test process of this run sees (the run's base temp).
    """

    def __init__(self, directory: Path) -> None:
        self.turnstile = directory / "side-by-side.turnstile"
        self.room = directory / "side-by-side.lock"

    def hold(self, alone: bool) -> Iterator[None]:
        with self.turnstile.open("a") as turnstile, self.room.open("a") as room:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            try:
                fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            finally:
                if not alone:
                    fcntl.flock(turnstile, fcntl.LOCK_UN)
            try:
                yield
            finally:
                fcntl.flock(room, fcntl.LOCK_UN)
                fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def side_by_side_turn(request: pytest.FixtureRequest,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A test's turn: shared with the others, or alone (``@pytest.mark.alone``)."""
    # Only in an xdist worker: an inner pytest that a test starts runs inside that test's
    # turn, and must not queue behind it.
    if not hasattr(request.config, "workerinput"):
        yield
        return
    lock = SideBySide(tmp_path_factory.getbasetemp().parent)
    yield from lock.hold(alone=request.node.get_closest_marker("alone") is not None)


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
