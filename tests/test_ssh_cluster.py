"""The cluster verbs over real OpenSSH servers: two test hosts on 127.0.0.2 and 127.0.0.3.

Each host is a real ``sshd`` with its own directory as its disk; the head node
(the test) reaches them only over SSH/SFTP, so node-local outputs really are
out of its sight until fetched. Workers are real Celery workers started by
``coordinator cluster up`` through those sshd servers, on the suite's Redis.
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from coordinator import JobState, get_run, submit
from coordinator.cli import build_parser
from coordinator.redis_server import RedisServer
from tests.helpers import BIN, REPO, echo_job, run_cli, write_jobs
from tests.sshd import (
    SshHost,
    free_port,
    inventory_text,
    keygen,
    node_venv,
    require_sshd,
)
from tests.waiting import wait_for
from worker_tasks import signing

PYTHON = str(BIN / "python")
LABELS = ("rig-a", "rig-b")


@dataclass
class SshCluster:
    """Two test hosts, their inventory, the Redis they use, and the head node's directory."""

    root: Path
    key: Path
    hosts: dict[str, SshHost]
    redis: RedisServer
    inventory: Path
    head: Path

    def cli(self, *args: str, tool: str = "coordinator", inventory: Path | None = None,
            cwd: Path | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        full_env = {"SC_BROKER_URL": self.redis.url,
                    "SC_INVENTORY": str(inventory or self.inventory), **(env or {})}
        return run_cli(*args, tool=tool, cwd=cwd or self.head, env=full_env)

    def pidfile(self, label: str) -> Path:
        return self.hosts[label].workdir / ".scripts-coordinator" / f"worker-{label}.pid"

    def worker_pid(self, label: str) -> int:
        return int(self.pidfile(label).read_text())


def session_alive(sid: int) -> list[int]:
    from worker_tasks.daemon import session_members

    return session_members(sid)


def processes_under(root: Path) -> list[str]:
    """Live processes whose command line or working directory lies under ``root``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (str(root) in cmdline or Path(cwd).is_relative_to(root)):
            found.append(f"{entry.name}: {cmdline}")  # whole: a deep clone pushes names far
    return found


def kill_workers(env: SshCluster) -> None:
    """Whatever a failed test left running on the hosts: their worker sessions."""
    from worker_tasks.daemon import kill_session

    for label in env.hosts:
        try:
            kill_session(env.worker_pid(label))
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def ssh_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshCluster]:
    require_sshd()
    root = tmp_path_factory.mktemp("ssh-cluster")
    key = keygen(root / "id_ed25519")
    hosts = {label: SshHost(f"127.0.0.{index}", root / label, key.with_suffix(".pub"))
             for index, label in enumerate(LABELS, start=2)}
    head = root / "head"
    (head / "scripts" / "examples").mkdir(parents=True)
    builtin = REPO / "worker_tasks" / "builtin_scripts"  # the pipeline's scripts, as copies
    shutil.copy(builtin / "full_scoring_worker.py", head / "scripts")
    shutil.copy(builtin / "examples" / "write_output.py", head / "scripts" / "examples")
    inventory = root / "cluster.toml"
    inventory.write_text(inventory_text(hosts, key, PYTHON))
    with RedisServer() as redis:
        env = SshCluster(root, key, hosts, redis, inventory, head)
        try:
            for host in hosts.values():
                host.start()
            yield env
        finally:
            kill_workers(env)
            for host in hosts.values():
                host.stop()


@pytest.fixture()
def workers_up(ssh_cluster: SshCluster) -> Iterator[SshCluster]:
    """Scripts deployed and both workers started; stopped (at once) after the test."""
    deployed = ssh_cluster.cli("cluster", "deploy", "--scripts-dir", "scripts")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    started = ssh_cluster.cli("cluster", "up")
    assert started.returncode == 0, started.stdout + started.stderr
    yield ssh_cluster
    ssh_cluster.cli("cluster", "down", "--now")




def test_step3_over_ssh_from_init_to_down(ssh_cluster: SshCluster) -> None:
    env = ssh_cluster
    # init: a commented example that is itself a valid inventory.
    example = env.cli("cluster", "init")
    assert example.returncode == 0 and "[nodes.rig-a]" in example.stdout
    # ... and the head's signing key, made once, readable by its owner only.
    head_key, head_cert = signing.head_key_files()
    assert "made the head node's signing key" in example.stderr
    assert head_key.stat().st_mode & 0o777 == 0o600
    (env.root / "example.toml").write_text(example.stdout)
    listed = env.cli("cluster", "unit", "rig-b", inventory=env.root / "example.toml")
    assert listed.returncode == 0 and "gpu-node-2.lan" in listed.stdout

    # deploy: scripts to every node; a second deploy moves nothing. (Whichever test of this
    # module ran first may have deployed, and added scripts: the counts are of a first deploy
    # of what the head holds now.)
    for host in env.hosts.values():
        shutil.rmtree(host.scripts_dir, ignore_errors=True)
    scripts = sum(path.is_file() for path in (env.head / "scripts").rglob("*"))
    deployed = env.cli("cluster", "deploy", "--scripts-dir", "scripts")
    assert deployed.returncode == 0, deployed.stderr
    for label, host in env.hosts.items():
        assert f"{label}" in deployed.stdout
        assert (host.scripts_dir / "examples" / "write_output.py").is_file()
        assert (host.scripts_dir / "full_scoring_worker.py").read_bytes() == \
            (REPO / "full_scoring_worker.py").read_bytes()
    assert f"sent {scripts} files" in deployed.stdout
    for host in env.hosts.values():  # the certificate, never the key, in each trust store
        trusted = host.workdir / ".scripts-coordinator" / "trusted"
        assert [path.name for path in trusted.iterdir()] == ["head.crt"]
        assert (trusted / "head.crt").read_bytes() == head_cert.read_bytes()
    again = env.cli("cluster", "deploy", "--scripts-dir", "scripts")
    assert again.stdout.count(f"nothing to send; {scripts} files unchanged") == 2

    # up: one detached worker per node, pid file and log on the node; idempotent.
    up = env.cli("cluster", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    pids = {label: env.worker_pid(label) for label in LABELS}
    assert all(session_alive(pid) for pid in pids.values())
    assert env.cli("cluster", "up").stdout.count("already running") == 2
    assert {label: env.worker_pid(label) for label in LABELS} == pids

    status = env.cli("cluster", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    # Which Redis the broker is, and that it has no replica (see test_failover for some).
    assert f"broker: Redis at 127.0.0.1:{env.redis.port} (master), 0 replica(s): a single " \
        "copy of the queues and records" in status.stdout
    # Each node made its own key on its own disk; the head holds only their certificates,
    # and verifies the signed replies of both (ping ok).
    node_certs = signing.keys_dir() / signing.NODE_CERTS_DIR
    assert sorted(path.name for path in node_certs.iterdir()) == ["rig-a.crt", "rig-b.crt"]
    for label, host in env.hosts.items():
        keys = host.workdir / ".scripts-coordinator" / "keys"
        assert (keys / "node.key").stat().st_mode & 0o777 == 0o600
        assert (keys / "node.crt").read_bytes() == (node_certs / f"{label}.crt").read_bytes()
        up_line = next(line for line in up.stdout.splitlines() if line.startswith(label))
        assert f"ok     node key made: {keys / 'node.key'}; " in up_line
    assert not list(node_certs.parent.rglob("node.key"))
    assert "signing: jobs and commands are signed with this head node's key; replies " \
        f"verified against 2 node certificate(s) in {node_certs}" in status.stdout
    for label in LABELS:
        line = next(line for line in status.stdout.splitlines() if line.startswith(label))
        assert f"ssh ok, worker pid {pids[label]} alive, ping ok, queue 0, idle" in line

    # A 36-job Step 3 run in the original format; inputs exist only on the head node.
    head = env.head
    assert env.cli("demo-data", "--out-dir", ".", "--candidates", "20000", "--draws", "40",
                   "--secret-seed", "123456789").returncode == 0
    made = env.cli("jobs", "scoring", "--survivors", "survivors.json", "--train-history",
                   "train_history.json", "--chunks", "36", "--prng-type", "java_lcg",
                   "--mod", "1000")
    assert made.returncode == 0, made.stderr
    assert "36 jobs over rig-a, rig-b" in made.stdout  # --nodes from the inventory
    run = env.cli("--jobs-file", "scoring_jobs.json", tool="scripts-coordinator")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "36/36 succeeded" in run.stdout
    assert "pushed rig-a" in run.stderr and "pushed rig-b" in run.stderr
    out = head / "full_scoring_results"
    assert len(list(out.glob("chunk_*.json.done"))) == 36
    assert len(list(out.glob("chunk_*.json"))) == 36
    for label, host in env.hosts.items():
        # Each node holds exactly its own half of the outputs, on its own disk.
        node_out = host.workdir / "full_scoring_results"
        assert len(list(node_out.glob("chunk_*.json.done"))) == 18
        assert (host.workdir / "scoring_chunks").is_dir()  # inputs were pushed
        line = next(line for line in run.stdout.splitlines() if line.startswith(f"fetch: {label}"))
        assert "fetched 36 files (0 already here) for 18 jobs" in line
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["all_succeeded"] and summary["succeeded"] == 36

    # The same jobs on a local cluster give the identical merged ranking.
    local = env.cli("local", "--jobs-file", "scoring_jobs.json", "--output-dir", "local_results",
                    "--scripts-dir", "scripts")
    assert local.returncode == 0, local.stdout + local.stderr
    over_ssh = json.loads((out / "survivors_with_scores.json").read_text())
    on_local = json.loads((head / "local_results" / "survivors_with_scores.json").read_text())
    assert over_ssh == on_local
    assert over_ssh["results"][0]["seed"] == 123456789

    # A second collect finds every file already home (same size): nothing moves.
    run_id = summary["run_id"]
    collected = env.cli("collect", run_id)
    assert collected.returncode == 0
    assert collected.stdout.count("fetched 0 files (36 already here)") == 2

    # Every job was signed and verified; a node whose trust store lacks the head's
    # certificate runs nothing and says so.
    for label, host in env.hosts.items():
        log = (host.workdir / ".scripts-coordinator" / f"worker-{label}.log").read_text()
        assert "signing: only jobs signed by a key whose certificate is in" in log
    rig_b = env.hosts["rig-b"]
    (rig_b.workdir / ".scripts-coordinator" / "trusted" / "head.crt").unlink()
    (head / "one_b.json").write_text(json.dumps([{
        "job_id": "untrusted", "script": "examples/write_output.py", "node": "rig-b",
        "args": ["--output-file", "again/untrusted.json"]}]))
    untrusted = env.cli("submit", "--jobs-file", "one_b.json", "--output-dir", "again")
    assert untrusted.returncode == 0, untrusted.stderr
    b_log = rig_b.workdir / ".scripts-coordinator" / "worker-rig-b.log"
    wait_for(lambda: "Unknown certificate" in b_log.read_text(), 30,
             "rig-b to refuse the jobs its trust store no longer vouches for")
    assert not (rig_b.workdir / "again").exists()
    assert env.cli("cancel", untrusted.stdout.strip()).returncode == 0

    # A node's key makes no other node run anything: rig-b's key (as if rig-b were taken)
    # signs a job for rig-a, which trusts only the head's certificate.
    rig_b_keys = rig_b.workdir / ".scripts-coordinator" / "keys"
    (head / "one_a.json").write_text(json.dumps([{
        "job_id": "from_rig_b", "script": "examples/write_output.py", "node": "rig-a",
        "args": ["--output-file", "again/from_rig_b.json"]}]))
    forged = env.cli("submit", "--jobs-file", "one_a.json", "--output-dir", "again",
                     env={signing.KEY_VARIABLE: str(rig_b_keys / "node.key"),
                          signing.CERT_VARIABLE: str(rig_b_keys / "node.crt")})
    assert forged.returncode == 0, forged.stderr
    a_log = env.hosts["rig-a"].workdir / ".scripts-coordinator" / "worker-rig-a.log"
    wait_for(lambda: f"refused message {forged.stdout.strip()}.from_rig_b.0: its signature "
             "does not verify" in a_log.read_text(), 30, "rig-a to refuse rig-b's job")
    assert not (env.hosts["rig-a"].workdir / "again").exists()
    assert env.cli("cancel", forged.stdout.strip()).returncode == 0
    # rig-b, no longer trusting the head, refuses its signed ping; a node whose certificate
    # the head no longer holds (rig-a) cannot answer for itself: neither is "ping ok".
    (node_certs / "rig-a.crt").unlink()
    status = env.cli("cluster", "status")
    # What each node taught the head of its speed at Step 3, from the run's own attempts.
    speeds = next(line for line in status.stdout.splitlines()
                  if line.startswith("speeds of full_scoring_worker.py: "))
    assert "rig-a " in speeds and "rig-b " in speeds and " 1.00 (" in speeds
    for label in LABELS:
        line = next(line for line in status.stdout.splitlines() if line.startswith(label))
        assert "no ping answer" in line, status.stdout
    assert "skipped a control reply that does not verify" in status.stderr
    assert "refused control message: it cannot be read or does not verify" in \
        b_log.read_text()

    logs = env.cli("cluster", "logs", "rig-a", "--lines", "3")
    assert logs.returncode == 0
    assert len(logs.stdout.splitlines()) == 3 and "succeeded in" in logs.stdout

    down = env.cli("cluster", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.count("stopped worker pid") == 2
    for label, pid in pids.items():
        assert not env.pidfile(label).exists()
        assert session_alive(pid) == []
    assert env.cli("cluster", "status").returncode == 6
    for host in env.hosts.values():
        host.stop()
    assert processes_under(env.root) == []
    for host in env.hosts.values():
        host.start()


def test_up_reports_each_failed_node_in_one_line_and_starts_the_others(
        ssh_cluster: SshCluster) -> None:
    env = ssh_cluster
    other_key = keygen(env.root / "not_authorized")
    rig_a, rig_b = env.hosts["rig-a"], env.hosts["rig-b"]
    extra = (f'[nodes.rig-gone]\nhost = "127.0.0.4"\nport = {free_port("127.0.0.4")}\n'
             f'scripts_dir = "/nonexistent"\nworkdir = "/nonexistent"\n\n'
             f'[nodes.rig-nokey]\nhost = "{rig_a.address}"\nport = {rig_a.port}\n'
             f'key = "{other_key}"\nuser = "{rig_a.user}"\n'
             f'scripts_dir = "{rig_a.scripts_dir}"\nworkdir = "{rig_a.workdir}"\n\n'
             f'[nodes.rig-nopython]\nhost = "{rig_b.address}"\nport = {rig_b.port}\n'
             f'user = "{rig_b.user}"\npython = "/nonexistent/venv/bin/python"\n'
             f'scripts_dir = "{rig_b.scripts_dir}"\nworkdir = "{rig_b.workdir}"\n')
    inventory = env.root / "faulty.toml"
    inventory.write_text(inventory_text(env.hosts, env.key, PYTHON, extra_nodes=extra))
    assert env.cli("cluster", "deploy", "--scripts-dir", "scripts", "rig-a", "rig-b",
                   inventory=inventory).returncode == 0
    try:
        up = env.cli("cluster", "up", inventory=inventory)
        assert up.returncode == 6
        lines = {line.split()[0]: line for line in up.stdout.splitlines()}
        assert set(lines) == {"rig-a", "rig-b", "rig-gone", "rig-nokey", "rig-nopython"}
        assert " ok " in lines["rig-a"] and " ok " in lines["rig-b"]
        assert "FAILED unreachable: " in lines["rig-gone"]
        assert "Connection refused" in lines["rig-gone"] or "refused" in lines["rig-gone"]
        assert f"FAILED auth refused by {rig_a.user}@{rig_a.address}:{rig_a.port}" in \
            lines["rig-nokey"]
        assert ("FAILED Python missing on the node: /nonexistent/venv/bin/python not found"
                in lines["rig-nopython"])
        assert "3 of 5 nodes failed (rig-gone, rig-nokey, rig-nopython)" in up.stderr
        assert len(up.stderr.strip().splitlines()) == 1
        assert all(session_alive(env.worker_pid(label)) for label in LABELS)
    finally:
        assert env.cli("cluster", "down", "rig-a", "rig-b", inventory=inventory).returncode == 0


def test_a_killed_worker_is_seen_and_up_replaces_its_stale_pid_file(
        workers_up: SshCluster) -> None:
    env = workers_up
    old = env.worker_pid("rig-b")
    from worker_tasks.daemon import kill_session

    kill_session(old)  # the node's worker dies (OOM killer, a reboot, ...)
    status = env.cli("cluster", "status")
    assert status.returncode == 6
    line = next(line for line in status.stdout.splitlines() if line.startswith("rig-b"))
    assert f"FAILED ssh ok, no worker running (stale pid file, pid {old}), no ping answer" in line
    up = env.cli("cluster", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"replaced stale pid file (pid {old} gone)" in up.stdout
    assert "already running" in next(line for line in up.stdout.splitlines()
                                     if line.startswith("rig-a"))
    assert env.worker_pid("rig-b") != old and session_alive(env.worker_pid("rig-b"))
    assert env.cli("cluster", "status").returncode == 0


def test_a_worker_that_dies_at_start_is_reported_with_its_log(ssh_cluster: SshCluster) -> None:
    env = ssh_cluster
    # A result backend the worker cannot load: the Celery worker exits during start-up.
    up = env.cli("cluster", "up", "rig-a", env={"SC_RESULT_BACKEND": "nosuchbackend://x"})
    assert up.returncode == 6
    line = up.stdout.strip()
    assert line.startswith("rig-a") and "FAILED worker died at start (exit status 1)" in line
    assert "No module named 'nosuchbackend'" in line  # the log's last line, quoted
    assert len(up.stdout.strip().splitlines()) == 1
    assert not env.pidfile("rig-a").exists()


def test_down_is_warm_by_default_and_now_kills_the_job(workers_up: SshCluster,
                                                       tmp_path: Path) -> None:
    env = workers_up
    workdir = env.hosts["rig-a"].workdir
    warm = submit([echo_job("warm", "rig-a", "down", "--sleep", "4")], output_dir="down",
                  broker_url=env.redis.url)
    wait_for(lambda: warm.status().jobs[0].state is JobState.RUNNING, 60, "the job to start")
    down = env.cli("cluster", "down", "rig-a")
    assert down.returncode == 0, down.stdout + down.stderr
    # Warm: the running job finished and wrote its marker before the worker exited.
    assert (workdir / "down" / "warm.json.done").exists()
    assert warm.status().jobs[0].state is JobState.SUCCEEDED

    assert env.cli("cluster", "up", "rig-a").returncode == 0
    pid = env.worker_pid("rig-a")
    # Cold, so that the script's command line names it (a warm fork's is its zygote's).
    submit([{**echo_job("hard", "rig-a", "down", "--sleep", "60", "--child-sleep", "60"),
             "warm": False}], output_dir="down", broker_url=env.redis.url)
    wait_for(lambda: len([line for line in processes_under(workdir)
                          if "write_output" in line]) == 2, 60, "the script and its child")
    down = env.cli("cluster", "down", "rig-a", "--now")
    assert down.returncode == 0 and "killed worker pid" in down.stdout
    assert session_alive(pid) == []
    assert processes_under(workdir) == []  # no orphaned script
    assert not (workdir / "down" / "hard.json.done").exists()


def test_cluster_status_reads_queue_lengths_from_the_broker(workers_up: SshCluster) -> None:
    """The tracking Redis may be another server (``SC_TRACKING_URL``): the queues are the
    broker's. A decoy list of the queue's name in the tracking Redis must not be counted."""
    env = workers_up
    with RedisServer() as tracking:
        decoy = redis.Redis.from_url(tracking.url)
        for count, label in enumerate(LABELS, start=5):
            decoy.rpush(f"node.{label}", *[b"not a message"] * count)
        status = env.cli("cluster", "status", env={"SC_TRACKING_URL": tracking.url})
    assert status.returncode == 0, status.stdout + status.stderr
    for label in LABELS:
        line = next(line for line in status.stdout.splitlines() if line.startswith(label))
        assert "ping ok, queue 0, idle" in line, status.stdout


def test_a_job_whose_output_cannot_be_fetched_is_named_in_the_summary(
        workers_up: SshCluster) -> None:
    env = workers_up
    jobs = write_jobs(env.head / "fetch_jobs.json",
                      [echo_job("kept", "rig-b", "f"), echo_job("lost", "rig-b", "f")])
    submitted = env.cli("submit", "--jobs-file", str(jobs), "--output-dir", "fetchtest")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    node_out = env.hosts["rig-b"].workdir / "fetchtest"
    wait_for(lambda: len(list(node_out.glob("*.done"))) == 2, 60, "both jobs to finish")
    run = get_run(run_id, env.redis.url)
    wait_for(lambda: run.status().finished, 30, "both records to settle")
    # Its log is on rig-b's own disk: coordinator log reads it there, over SFTP.
    log = env.cli("log", run_id, "kept")
    assert log.returncode == 0, log.stderr
    assert log.stdout.startswith("[scripts-coordinator] attempt 1 of kept on rig-b@")
    assert f"log of job kept of run {run_id}: rig-b:" in log.stderr
    assert "succeeded in" in log.stdout
    (node_out / "lost.json").unlink()  # the node lost the output after the job succeeded
    collected = env.cli("collect", run_id, "--fetch")
    assert collected.returncode == 1
    assert (f"FAILED lost on rig-b: could not fetch {node_out / 'lost.json'} from node rig-b: "
            f"not on the node") in collected.stdout
    summary = json.loads((env.head / "fetchtest" / "run_summary.json").read_text())
    states = {job["job_id"]: job["state"] for job in summary["jobs"]}
    assert states == {"kept": "succeeded", "lost": "failed"}
    assert (env.head / "fetchtest" / "kept.json.done").exists()
    assert not (env.head / "fetchtest" / "lost.json.done").exists()  # marker only with output


def test_deploy_data_stays_inside_the_configured_paths(ssh_cluster: SshCluster) -> None:
    env = ssh_cluster
    (env.head / "inputs" / "deep").mkdir(parents=True)
    (env.head / "inputs" / "deep" / "x.json").write_text("[1, 2, 3]")
    done = env.cli("cluster", "deploy", "rig-b", "--no-scripts", "--data", "inputs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data: sent 1 files" in done.stdout
    assert (env.hosts["rig-b"].workdir / "inputs" / "deep" / "x.json").read_text() == "[1, 2, 3]"
    assert not (env.hosts["rig-a"].workdir / "inputs").exists()
    for outside in ("../escape", "/etc/hostname"):
        refused = env.cli("cluster", "deploy", "--no-scripts", "--data", outside)
        assert refused.returncode == 2
        assert "give a path inside the working directory" in refused.stderr
    unknown = env.cli("cluster", "up", "rig-zz")
    assert unknown.returncode == 2 and "no node 'rig-zz' in the inventory" in unknown.stderr


def test_deploy_ships_scripts_only(ssh_cluster: SshCluster) -> None:
    """`cluster deploy --scripts-dir .` from the head's directory: not its inventory, keys,
    outputs or data (issue 22, item 4)."""
    env = ssh_cluster
    here = env.root / "head_dir"
    (here / "full_scoring_results").mkdir(parents=True)
    (here / "step_y.py").write_text("print('y')\n")
    inventory = here / "cluster.toml"
    inventory.write_text(env.inventory.read_text())
    (here / "id_ed25519").write_text("not a real key\n")
    (here / "full_scoring_results" / "r.json").write_text("{}")
    (here / "survivors.json").write_text("[1]")
    done = env.cli("cluster", "deploy", "rig-b", "--scripts-dir", ".", inventory=inventory,
                   cwd=here)
    assert done.returncode == 0, done.stdout + done.stderr
    shipped = sorted(path.relative_to(env.hosts["rig-b"].scripts_dir).as_posix()
                     for path in Path(env.hosts["rig-b"].scripts_dir).rglob("*")
                     if path.is_file())
    assert "step_y.py" in shipped
    assert not {"cluster.toml", "id_ed25519", "survivors.json",
                "full_scoring_results/r.json"} & set(shipped), shipped
    assert "scripts: left out the inventory: cluster.toml" in done.stdout
    assert "scripts: left out key files: id_ed25519" in done.stdout
    assert ("scripts: left out outputs and data (deploy data with --data): "
            "full_scoring_results/r.json, survivors.json") in done.stdout


def test_the_systemd_unit_runs_the_same_worker_command(ssh_cluster: SshCluster) -> None:
    unit = ssh_cluster.cli("cluster", "unit", "rig-a")
    assert unit.returncode == 0
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.read_string(unit.stdout)
    service = parser["Service"]
    host = ssh_cluster.hosts["rig-a"]
    assert service["WorkingDirectory"] == str(host.workdir)
    assert service["EnvironmentFile"] == str(host.workdir / ".scripts-coordinator" /
                                             "worker-rig-a.env")
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    argv = shlex.split(service["ExecStart"])
    assert argv[:3] == [PYTHON, "-m", "coordinator"]
    args = build_parser().parse_args(argv[3:])
    assert (args.command, args.node, args.detach) == ("worker", "rig-a", False)
    assert args.scripts_dir == str(host.scripts_dir) and args.workdir == str(host.workdir)

    # Per GPU: a template unit, one instance per GPU, each the worker `up --per-gpu` starts.
    inventory = ssh_cluster.root / "two_gpus.toml"
    inventory.write_text(inventory_text({"rig-a": host}, ssh_cluster.key, PYTHON) + "gpus = 2\n")
    template = ssh_cluster.cli("cluster", "unit", "rig-a", "--per-gpu", inventory=inventory)
    assert template.returncode == 0, template.stderr
    assert template.stdout.startswith(
        "# /etc/systemd/system/scripts-coordinator-worker-rig-a@.service\n")
    assert ("systemctl enable --now scripts-coordinator-worker-rig-a@0 "
            "scripts-coordinator-worker-rig-a@1\n") in template.stdout
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.read_string(template.stdout)
    instance = shlex.split(parser["Service"]["ExecStart"].replace("%i", "1"))
    args = build_parser().parse_args(instance[3:])
    assert (args.node, args.gpu) == ("rig-a", 1)
    assert args.logfile == str(host.workdir / ".scripts-coordinator" / "worker-rig-a.gpu1.log")
    assert "queue node.rig-a.gpu%i" in parser["Unit"]["Description"]


def test_node_names_resolve_through_the_inventory(ssh_cluster: SshCluster) -> None:
    env = ssh_cluster
    by_address = echo_job("by_address", env.hosts["rig-b"].address, "n")
    jobs = write_jobs(env.head / "names.json", [by_address, echo_job("stranger", "rig-q", "n")])
    refused = env.cli("submit", "--jobs-file", str(jobs), "--dry-run")
    assert refused.returncode == 2
    assert ("job 1 (job_id 'stranger'): field 'node': 'rig-q' is not in the cluster inventory"
            in refused.stderr)
    write_jobs(jobs, [by_address])
    plan = env.cli("submit", "--jobs-file", str(jobs), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "node rig-b (queue node.rig-b): 1 jobs" in plan.stdout



def test_deploy_project_installs_this_build_with_the_nodes_python(
        ssh_cluster: SshCluster) -> None:
    """A node venv without the project gets it from a wheel built here."""
    env = ssh_cluster
    host = env.hosts["rig-b"]
    node_python = node_venv(host.disk, PYTHON)
    venv = node_python.parent.parent
    inventory = env.root / "project.toml"
    inventory.write_text(inventory_text({"rig-b": host}, env.key, str(node_python)))
    before = env.cli("cluster", "up", inventory=inventory)
    assert before.returncode == 6
    assert "scripts-coordinator is not installed for" in before.stdout

    # As the cluster section writes it: the scripts, then the project, on one connection.
    scripts = env.root / "pipeline"
    scripts.mkdir(exist_ok=True)
    (scripts / "step_x.py").write_text("print('step x')\n")
    deployed = env.cli("cluster", "deploy", "--scripts-dir", str(scripts), "--project",
                       inventory=inventory)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    # With the inventory's extras: worker (Numba) by default.
    assert "project: installed scripts_coordinator-" in deployed.stdout
    assert "-py3-none-any.whl[worker] (" in deployed.stdout, deployed.stdout
    assert (Path(host.scripts_dir) / "step_x.py").read_text() == "print('step x')\n"
    # As the node runs it: none of this process's environment (a PYTHONPATH would win).
    node_env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    where = subprocess.run([str(node_python), "-c",
                            "import coordinator; print(coordinator.__file__)"],
                           cwd=venv, env=node_env, check=True, capture_output=True, text=True,
                           timeout=60).stdout
    assert where.startswith(str(venv)), where
    status = env.cli("cluster", "status", inventory=inventory)
    assert "no worker running" in status.stdout and "version" not in status.stdout
    assert "engine numba " in status.stdout, status.stdout  # the node's fastest engine

    # A GPU node's extras: pip is asked for CuPy too (offline here, so it says it has none).
    inventory.write_text(inventory_text({"rig-b": host}, env.key, str(node_python)) +
                         'extras = ["worker", "gpu"]\n')
    gpu = env.cli("cluster", "deploy", "--project", "--no-scripts", inventory=inventory)
    assert gpu.returncode == 6, gpu.stdout + gpu.stderr
    line = next(line for line in gpu.stdout.splitlines() if line.startswith("rig-b"))
    assert "FAILED pip install of scripts_coordinator-" in line, line
    assert "-py3-none-any.whl[worker,gpu] failed on the node: " in line
    assert "cupy-cuda12x" in line, line

    # From a directory without scripts (as docs/cluster.md writes it): the project alone.
    inventory.write_text(inventory_text({"rig-b": host}, env.key, str(node_python)))
    empty = env.root / "no-scripts-here"
    empty.mkdir()
    refused = env.cli("cluster", "deploy", inventory=inventory, cwd=empty)
    assert refused.returncode == 2 and "--scripts-dir .: no files to deploy" in refused.stderr
    alone = env.cli("cluster", "deploy", "--project", inventory=inventory, cwd=empty)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert "scripts: none in .; deploying only the project" in alone.stdout
    assert "project: installed scripts_coordinator-" in alone.stdout, alone.stdout


def test_a_broker_password_from_the_environment_never_shows(ssh_cluster: SshCluster) -> None:
    env = ssh_cluster
    secret = "s3cret-Pa55"
    with RedisServer(password=secret) as private:
        host = env.hosts["rig-a"]
        inventory = env.root / "password.toml"
        inventory.write_text(inventory_text({"rig-a": host}, env.key, PYTHON) +
                             f'broker = "redis://127.0.0.1:{private.port}/0"\n')
        secret_env = {"SC_BROKER_PASSWORD": secret, "SC_BROKER_URL": private.url}
        try:
            up = env.cli("cluster", "up", inventory=inventory, env=secret_env)
            assert up.returncode == 0, up.stdout + up.stderr
            status = env.cli("cluster", "status", inventory=inventory, env=secret_env)
            assert status.returncode == 0, status.stdout + status.stderr
            envfile = host.workdir / ".scripts-coordinator" / "worker-rig-a.env"
            assert envfile.stat().st_mode & 0o777 == 0o600
            assert f"SC_BROKER_URL=redis://:{secret}@127.0.0.1:{private.port}/0" in \
                envfile.read_text()
            for pid in session_alive(env.worker_pid("rig-a")):
                assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            # A wrong password on the head node: refused, and the error masks the URL given.
            wrong = env.cli("cluster", "status", inventory=inventory,
                            env={"SC_BROKER_URL": private.url.replace(secret, "wrong-pw")})
            assert wrong.returncode == 3
            assert f"broker redis://:***@127.0.0.1:{private.port}/0 unreachable" in wrong.stderr
            for result in (up, status, wrong):
                assert secret not in result.stdout + result.stderr
                assert "wrong-pw" not in result.stdout + result.stderr
            kept = env.cli("cluster", "down", inventory=inventory, env=secret_env)
            assert kept.returncode == 0 and f"{envfile} stays (--purge removes it)" in \
                kept.stdout, kept.stdout
            assert envfile.exists()
            purged = env.cli("cluster", "down", "--purge", inventory=inventory, env=secret_env)
            assert purged.returncode == 0, purged.stdout + purged.stderr
            assert f"removed {envfile} (the broker password)" in purged.stdout
            assert not envfile.exists()
        finally:
            env.cli("cluster", "down", "--now", inventory=inventory, env=secret_env)


def test_a_balanced_step3_run_comes_home_from_whichever_node_ran_each_chunk(
        workers_up: SshCluster) -> None:
    env = workers_up
    head = env.head / "balanced"
    head.mkdir()
    assert env.cli("demo-data", "--out-dir", ".", "--candidates", "6000", "--draws", "30",
                   "--secret-seed", "987654321", cwd=head).returncode == 0
    made = env.cli("jobs", "scoring", "--survivors", "survivors.json", "--train-history",
                   "train_history.json", "--chunks", "12", "--prng-type", "java_lcg",
                   "--mod", "1000", cwd=head)
    assert made.returncode == 0, made.stderr
    run = env.cli("--jobs-file", "scoring_jobs.json", "--balance", "--output-dir", "bal",
                  tool="scripts-coordinator", cwd=head)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "12/12 succeeded" in run.stdout
    # The floating chunks' inputs went to both nodes before the run was published.
    assert "pushed rig-a" in run.stderr and "pushed rig-b" in run.stderr
    summary = json.loads((head / "bal" / "run_summary.json").read_text())
    where = {job["job_id"]: job["node"] for job in summary["jobs"]}
    assert set(where.values()) <= set(LABELS)
    for label, host in env.hosts.items():
        # Each chunk's marker is on the disk of the node that ran it, and only there.
        on_node = {path.name.removesuffix(".json.done")
                   for path in (host.workdir / "bal").glob("chunk_*.json.done")}
        assert on_node == {job_id for job_id, node in where.items() if node == label}
    assert len(list((head / "bal").glob("chunk_*.json.done"))) == 12
    local = env.cli("local", "--jobs-file", "scoring_jobs.json", "--output-dir", "local_bal",
                    "--scripts-dir", str(env.head / "scripts"), cwd=head)
    assert local.returncode == 0, local.stdout + local.stderr
    balanced = json.loads((head / "bal" / "survivors_with_scores.json").read_text())
    on_local = json.loads((head / "local_bal" / "survivors_with_scores.json").read_text())
    assert balanced == on_local and balanced["results"][0]["seed"] == 987654321


STRAGGLE = '''\
import json, os, sys, time
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
node = os.environ["SC_NODE"]
fast = os.path.exists(f"fast-{node}")  # in the node's own workdir
time.sleep(0.3 if fast else 60)
with open(args["--output-file"], "w") as fh:
    json.dump({"node": node}, fh)
'''


def test_a_backup_copys_output_comes_home_from_the_node_that_won(
        workers_up: SshCluster) -> None:
    """Node-local disks: the straggler's copy wins on the other node, and the head fetches
    the output and .done from there; the loser's node keeps neither, nor a hidden output."""
    env = workers_up
    (env.head / "scripts" / "straggle.py").write_text(STRAGGLE)
    assert env.cli("cluster", "deploy", "--scripts-dir", "scripts").returncode == 0
    for label, host in env.hosts.items():
        (host.workdir / f"fast-{label}").write_text("")
    learn = write_jobs(env.head / "learn.json", [
        {"job_id": f"learn-{label}", "script": "straggle.py", "node": label,
         "args": ["--output-file", f"learn/learn-{label}.json"]} for label in LABELS])
    taught = env.cli("--jobs-file", str(learn), "--output-dir", "learn",
                     tool="scripts-coordinator")
    assert taught.returncode == 0, taught.stdout + taught.stderr
    for label, host in env.hosts.items():  # now the first execution straggles, wherever
        (host.workdir / f"fast-{label}").unlink()
    jobs = write_jobs(env.head / "straggler.json", [
        {"job_id": "s", "script": "straggle.py", "node": "any",
         "args": ["--output-file", "copied/s.json"]}])
    client = redis.Redis.from_url(env.redis.url)
    with (env.head / "straggler.out").open("w") as out:
        head = subprocess.Popen(
            [str(BIN / "scripts-coordinator"), "--jobs-file", str(jobs), "--output-dir",
             "copied"], cwd=env.head, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "SC_BROKER_URL": env.redis.url,
                 "SC_INVENTORY": str(env.inventory)})
    try:
        def running_on() -> str | None:
            newest = client.zrange("sc:runs", -1, -1)
            if not newest:
                return None
            job = get_run(newest[0].decode(), env.redis.url).status().jobs[0]
            return job.node if job.state is JobState.RUNNING and job.node != "any" else None

        wait_for(running_on, 60, "the straggler to start")
        loser = running_on()
        winner = next(label for label in LABELS if label != loser)
        (env.hosts[winner].workdir / f"fast-{winner}").write_text("")
        assert head.wait(timeout=120) == 0, (env.head / "straggler.out").read_text()
    finally:
        if head.poll() is None:
            head.kill()
    said = (env.head / "straggler.out").read_text()
    assert f"a copy starts on idle {winner}" in said, said
    assert json.loads((env.head / "copied" / "s.json").read_text()) == {"node": winner}
    assert (env.head / "copied" / "s.json.done").exists()
    assert (env.hosts[winner].workdir / "copied" / "s.json.done").exists()
    assert not (env.hosts[loser].workdir / "copied" / "s.json.done").exists()
    wait_for(lambda: list((env.hosts[loser].workdir / "copied").glob(".s.json.part-*")) == [],
             10, "the loser's hidden output removed")
