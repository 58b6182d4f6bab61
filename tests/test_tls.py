"""Encrypted links: a whole run through a Redis that speaks TLS only (Debian's
redis-server is built with it): workers, wait, collect, metrics and Flower on rediss://
with the CA in $SC_REDIS_CA; a plain-text client and a wrong CA each get one line, exit 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import submit
from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer, free_port
from tests.helpers import BIN, REPO, echo_job, run_cli
from tests.test_observe import metric
from tests.tls import make_ca_and_server
from tests.waiting import wait_for
from worker_tasks.connections import CA_VARIABLE


@pytest.fixture()
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A TLS-only Redis; its CA in this process's environment (its commands, its workers)."""
    ca, cert, key = make_ca_and_server(tmp_path / "tls")
    monkeypatch.setenv(CA_VARIABLE, str(ca))
    with RedisServer(tls=(ca, cert, key)) as server:
        yield server


def test_a_whole_run_over_tls(tls_server: RedisServer, tmp_path: Path) -> None:
    server = tls_server
    assert server.url.startswith("rediss://")
    with LocalCluster(["rig-a", "rig-b"], scripts_dir=REPO, workdir=tmp_path,
                      log_dir=tmp_path / "logs", broker_url=server.url):
        run_through(server, tmp_path)


def run_through(server: RedisServer, tmp_path: Path) -> None:
    run = submit([echo_job("tls_a", "rig-a", "o"), echo_job("tls_b", "rig-b", "o")],
                 output_dir="o", broker_url=server.url)
    env = {"SC_BROKER_URL": server.url}
    waited = run_cli("wait", run.id, env=env, cwd=tmp_path, timeout=120)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "2/2 succeeded" in waited.stdout
    collected = run_cli("collect", run.id, env=env, cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    assert json.loads((tmp_path / "o" / "run_summary.json").read_text())["succeeded"] == 2
    textfile = tmp_path / "sc.prom"
    assert run_cli("metrics", "--textfile", str(textfile), env=env).returncode == 0
    assert metric(textfile.read_text(), "sc_node_workers", node="rig-a") == 1
    assert metric(textfile.read_text(), "sc_run_jobs", run=run.id, state="succeeded") == 2
    port = free_port()
    flower = subprocess.Popen([str(BIN / "coordinator"), "flower", "--port", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    def workers_seen() -> object:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers?refresh=1",
                                        timeout=5) as response:
                return sorted(json.loads(response.read()))
        except OSError:
            return None

    try:
        wait_for(lambda: [name.split("@")[0] for name in workers_seen() or []]
                 == ["rig-a", "rig-b"], 90, "Flower to see both workers over TLS", every=0.5)
    finally:
        flower.terminate()
        flower.wait(timeout=30)


def test_plain_text_and_a_wrong_ca_are_one_line_each(tls_server: RedisServer,
                                                      tmp_path: Path) -> None:
    server = tls_server
    plain = run_cli("runs", "--broker", server.url.replace("rediss://", "redis://"))
    assert plain.returncode == 3
    assert plain.stderr.count("\n") == 1 and "use a rediss:// URL" in plain.stderr
    other_ca, _, _ = make_ca_and_server(tmp_path / "other", "other")
    wrong = run_cli("runs", "--broker", server.url, env={CA_VARIABLE: str(other_ca)})
    assert wrong.returncode == 3
    assert wrong.stderr.count("\n") == 1
    assert "certificate does not verify against" in wrong.stderr
    assert "Traceback" not in plain.stderr + wrong.stderr
