"""docker-compose.yml, checked by parsing it and running its services' commands here."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from coordinator import JobState, submit
from coordinator.local import worker_name
from coordinator.redis_server import RedisServer, free_port
from tests.conftest import BIN, REPO, echo_job

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def service_command(name: str, workdir: Path) -> list[str]:
    """The service's command, with container paths mapped to this checkout."""
    command = COMPOSE["services"][name]["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    mapped = [str(REPO) if arg == "/app" else str(workdir) if arg == "/work" else arg
              for arg in argv]
    return [str(BIN / mapped[0]), *mapped[1:]]


def test_compose_declares_broker_dashboard_and_one_worker_per_node() -> None:
    services = COMPOSE["services"]
    assert {"redis", "flower", "worker-rig-a", "worker-rig-b", "coordinator"} <= set(services)
    assert "--appendonly yes" in services["redis"]["command"]
    for node in ("rig-a", "rig-b"):
        service = services[f"worker-{node}"]
        assert f"--node {node}" in service["command"]
        assert service["environment"]["SC_BROKER_URL"] == "redis://redis:6379/0"
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]


def http_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_worker_and_flower_commands_run_and_flower_sees_the_job(tmp_path: Path) -> None:
    port = free_port()
    with RedisServer() as server:
        env = dict(os.environ, SC_BROKER_URL=server.url, FLOWER_UNAUTHENTICATED_API="true")
        flower_cmd = [arg.replace("0.0.0.0", "127.0.0.1").replace("5555", str(port))
                      for arg in service_command("flower", tmp_path)]
        processes = [
            subprocess.Popen(service_command("worker-rig-a", tmp_path), env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True),
            subprocess.Popen(flower_cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True),
        ]
        try:
            deadline = time.monotonic() + 90
            workers: object = {}
            while time.monotonic() < deadline:  # Flower up and the worker known to it
                assert all(p.poll() is None for p in processes), "a service command exited"
                try:
                    workers = http_json(f"http://127.0.0.1:{port}/api/workers?refresh=1")
                    if worker_name("rig-a") in workers:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            assert worker_name("rig-a") in workers
            run = submit([echo_job("seen", "rig-a")], output_dir="o", broker_url=server.url)
            assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
            task_id = run.status().jobs[0].task_id
            tasks: dict = {}
            while time.monotonic() < deadline:
                tasks = http_json(f"http://127.0.0.1:{port}/api/tasks")  # type: ignore[assignment]
                if tasks.get(task_id, {}).get("state") == "SUCCESS":
                    break
                time.sleep(0.5)
            assert tasks[task_id]["state"] == "SUCCESS"
            assert tasks[task_id]["name"] == "scripts_coordinator.run_job"
            assert tasks[task_id]["worker"] == worker_name("rig-a")
            assert (tmp_path / "o" / "seen.json.done").exists()
        finally:
            for process in processes:
                os.killpg(process.pid, signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.mark.parametrize("command", [["coordinator", "--help"],
                                     ["coordinator", "worker", "--help"],
                                     ["scripts-coordinator", "--help"],
                                     ["full-scoring-worker", "--help"]])
def test_help_teaches_with_examples(command: list[str]) -> None:
    result = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "example" in result.stdout
