"""The Redis users of docs/cluster.md ("Least privilege"), applied to a real Redis as
written: a job runs with the workers on their own user, which can do nothing of
``@dangerous``; the default user is off."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import redis

from coordinator import JobState, submit
from coordinator.local import LocalCluster
from coordinator.redis_server import RedisServer
from tests.helpers import REPO, echo_job
from tests.test_deploy import redis_cli

SECTION = "## Least privilege: Redis users for the head and the workers"
PASSWORDS = {"REDIS_PASSWORD": "acl-admin-s3cret", "SC_HEAD_REDIS_PASSWORD": "acl-head-s3cret",
             "SC_WORKER_REDIS_PASSWORD": "acl-worker-s3cret"}
# What the workers' user must never do (a sample of @dangerous).
DANGEROUS = [["FLUSHALL"], ["FLUSHDB"], ["CONFIG", "GET", "dir"], ["DEBUG", "SLEEP", "0"],
             ["SHUTDOWN"], ["KEYS", "*"], ["ACL", "LIST"], ["MONITOR"]]


def recipe() -> str:
    text = (REPO / "docs" / "cluster.md").read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the section has no bash block"
    return block.group(1)


@pytest.fixture()
def locked(tmp_path: Path) -> tuple[RedisServer, str, str]:
    with RedisServer(password=PASSWORDS["REDIS_PASSWORD"]) as server:
        script = recipe().replace("redis-cli", f"{redis_cli()} -p {server.port}")
        done = subprocess.run(["bash", "-euc", script], env={**os.environ, **PASSWORDS},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and "ERR" not in done.stdout, done.stdout + done.stderr
        base = f"127.0.0.1:{server.port}/0"
        yield (server, f"redis://sc-head:{PASSWORDS['SC_HEAD_REDIS_PASSWORD']}@{base}",
               f"redis://sc-worker:{PASSWORDS['SC_WORKER_REDIS_PASSWORD']}@{base}")


def test_the_workers_user_runs_jobs_and_nothing_dangerous(
        locked: tuple[RedisServer, str, str], tmp_path: Path) -> None:
    server, head, worker = locked
    with LocalCluster(["rig-a"], scripts_dir=REPO, workdir=tmp_path,
                      log_dir=tmp_path / "logs", broker_url=worker) as cluster:
        run = submit([echo_job("acl_ok", "rig-a", "o")], output_dir="o", broker_url=head)
        assert run.wait(timeout=60).jobs[0].state is JobState.SUCCEEDED
        assert run.cancel() == 0  # the head administers its runs
        assert cluster.workers["rig-a"].poll() is None
    assert "NOPERM" not in (tmp_path / "logs" / "worker-rig-a.log").read_text()
    admin = redis.Redis.from_url(head)
    for command in DANGEROUS:
        verdict = admin.execute_command("ACL", "DRYRUN", "sc-worker", *command)
        assert b"no permissions" in verdict, (command, verdict)
    assert admin.execute_command("ACL", "DRYRUN", "sc-head", "FLUSHALL") == b"OK"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, password=PASSWORDS["REDIS_PASSWORD"]).ping()
