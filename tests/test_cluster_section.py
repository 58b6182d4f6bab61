"""docs/cluster.md's walk-through, played as written over the real sshd test hosts.

The section's first ``bash`` block is read from the file and run command by command
(each through ``bash -c`` in an empty head directory, its exit status asserted), so the
doc cannot drift from what works. What differs here, and only that: the suite's own
Redis (with a password) stands for the apt-installed one, the suite's venv for the
head's, the two hosts are loopback addresses with their own disks, and the inventory
``cluster init`` prints is edited the way a user would (hosts, ports, paths, key; CPU
hosts: ``extras = ["worker"]``), its other keys (``gpus = 2``) kept.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coordinator.redis_server import RedisServer
from tests.helpers import BIN, REPO
from tests.sshd import SshHost, keygen, node_venv, require_sshd
from tests.test_ssh_cluster import processes_under
from tests.waiting import wait_for

SECTION = REPO / "docs" / "cluster.md"
PYTHON = str(BIN / "python")
PASSWORD = "walk/through%pass"  # needs percent-encoding in a URL: the project does it
# Seconds a command of the section may take (deploy --project builds a wheel).
COMMAND_TIMEOUT_S = 600


def section_commands(text: str) -> list[str]:
    """The commands of the section's first bash block: comments dropped, continued lines
    joined."""
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for line in block.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", line).rstrip()
        if not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        commands.append(pending + line.strip())
        pending = ""
    return commands


def edit_toml(text: str, edits: dict[str, dict[str, object]]) -> str:
    """Set keys of tables (``{"defaults": {"key": value}}``) in a commented TOML file as a
    user would: the key's line (commented out or not) rewritten, else one added to its
    table; every other line kept."""
    lines = text.splitlines()
    table, done, last = None, set(), {}
    for index, line in enumerate(lines):
        header = re.match(r"\[([^\]]+)\]", line)
        if header:
            table = header.group(1)
            last[table] = index
            continue
        key = re.match(r"#?\s*([A-Za-z_]+)\s*=", line)
        if table in edits and key and key.group(1) in edits[table]:
            name = key.group(1)
            lines[index] = f"{name} = {json.dumps(edits[table][name])}"
            done.add((table, name))
        if table and line.strip() and not line.startswith("#"):
            last[table] = index
    for table, values in reversed(list(edits.items())):
        added = [f"{name} = {json.dumps(value)}" for name, value in values.items()
                 if (table, name) not in done]
        lines[last[table] + 1:last[table] + 1] = added
    return "\n".join(lines) + "\n"


@dataclass
class Walk:
    """The head directory, the environment the section's commands build up, and the
    commands run (with each one's output)."""

    head: Path
    env: dict[str, str]
    ran: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["bash", "-c", command], cwd=self.head, env=self.env, text=True,
                              capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stdout}\n" \
                                     f"{done.stderr}"
        self.ran[command] = done
        return done


@pytest.fixture()
def ssh_hosts(tmp_path: Path) -> Iterator[tuple[dict[str, SshHost], Path]]:
    require_sshd()
    key = keygen(tmp_path / "id_ed25519")
    hosts = {label: SshHost(f"127.0.0.{index}", tmp_path / label, key.with_suffix(".pub"))
             for index, label in enumerate(("rig-a", "rig-b"), start=2)}
    try:
        for host in hosts.values():
            host.start()
        yield hosts, key
    finally:
        from worker_tasks.daemon import kill_session

        for host in hosts.values():
            for pidfile in (host.workdir / ".scripts-coordinator").glob("*.pid"):
                try:
                    kill_session(int(pidfile.read_text()))
                except (OSError, ValueError):
                    continue
            host.stop()


def test_the_cluster_section_runs_as_written_from_an_empty_head_directory(
        ssh_hosts: tuple[dict[str, SshHost], Path], tmp_path: Path) -> None:
    hosts_by_label, key = ssh_hosts
    commands = section_commands(SECTION.read_text())
    head = tmp_path / "head"
    head.mkdir()
    pythons = {label: node_venv(host.disk, PYTHON) for label, host in hosts_by_label.items()}
    with RedisServer(password=PASSWORD) as redis:
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        for name in [name for name in env if name.startswith("SC_")]:
            del env[name]
        # Stand-in: the head's key (cluster init) in this test's directory, not ~/.config.
        env["SC_KEYS_DIR"] = str(head / "head-keys")
        walk = Walk(head, env)

        def edit_inventory() -> None:
            inventory = head / "cluster.toml"
            edits: dict[str, dict[str, object]] = {"defaults": {
                "user": hosts_by_label["rig-a"].user, "key": str(key),
                "broker": f"redis://127.0.0.1:{redis.port}/0", "extras": ["worker"],
                "connect_timeout": 5}}
            for label, host in hosts_by_label.items():
                edits[f"nodes.{label}"] = {
                    "host": host.address, "port": host.port, "python": str(pythons[label]),
                    "scripts_dir": str(host.scripts_dir), "workdir": str(host.workdir)}
            inventory.write_text(edit_toml(inventory.read_text(), edits))
            nodes = tomllib.loads(inventory.read_text())["nodes"]
            assert nodes["rig-a"]["gpus"] == 2 and nodes["rig-b"]["gpus"] == 1  # from init
            (head / "scripts").mkdir()  # the user's own job scripts
            (head / "scripts" / "step_x.py").write_text("print('step x')\n")

        # How each command that cannot run verbatim here is stood in for, and the checks
        # that follow a command.
        def skip(command: str) -> None:
            return None

        def read_password(command: str) -> None:
            walk.env["REDIS_PASSWORD"] = PASSWORD

        def export(command: str) -> None:
            for assignment in command.removeprefix("export ").split():
                name, _, value = assignment.partition("=")
                value = value.replace("127.0.0.1:6379", f"127.0.0.1:{redis.port}")
                walk.env[name] = re.sub(r"\$(\w+)", lambda m: walk.env[m.group(1)], value)

        stand_ins: dict[str, Callable[[str], None]] = {
            "sudo apt-get install redis-server": skip,  # the suite's Redis
            "python3 -m venv .venv": skip,  # the suite's venv (it has [head])
            ". .venv/bin/activate": skip,
            "read -rs REDIS_PASSWORD": read_password,
            "export ": export,
        }

        def output(prefix: str) -> str:
            ran = [done for command, done in walk.ran.items() if command.startswith(prefix)]
            assert len(ran) == 1, f"the section runs {prefix!r} {len(ran)} times"
            return ran[0].stdout + ran[0].stderr

        def check_workers() -> None:
            """Before the run: what deploy, up --per-gpu and status did (a run without its
            workers would only wait)."""
            # deploy: the project with its extras on both nodes; the user's script, no inventory.
            deployed = output("coordinator cluster deploy --project")
            assert deployed.count("whl[worker] (") == 2, deployed
            assert (hosts_by_label["rig-a"].scripts_dir / "step_x.py").is_file()
            assert not (hosts_by_label["rig-a"].scripts_dir / "cluster.toml").exists()
            # up --per-gpu: two workers on the two-GPU node, one on the other.
            up = output("coordinator cluster up --per-gpu")
            assert up.count("started worker rig-a.gpu0@") == 1, up
            assert up.count("started worker rig-a.gpu1@") == 1 and "rig-b.gpu0@" in up
            status = output("coordinator cluster status")
            rig_a = next(line for line in status.splitlines() if line.startswith("rig-a"))
            assert re.search(r"gpu0: worker pid \d+ alive, ping ok, queue 0, idle; "
                             r"gpu1: worker pid \d+ alive, ping ok, queue 0, idle; engine numba ",
                             rig_a), rig_a

        after = {"coordinator cluster init > cluster.toml": edit_inventory,
                 "coordinator cluster status": check_workers}

        for command in commands:
            stand_in = next((run for prefix, run in stand_ins.items()
                             if command.startswith(prefix)), None)
            if stand_in is not None:
                stand_in(command)
            else:
                walk.run(command)
            if command in after:
                after[command]()
        assert "'scripts-coordinator[head]'" in commands[1]  # the head's install has the verbs

        # The run: every chunk, the outputs fetched home, the secret seed at rank 1.
        ran = output("scripts-coordinator --jobs-file scoring_jobs.json --per-gpu")
        assert "36/36 succeeded" in ran, ran
        merged = json.loads((head / "full_scoring_results" /
                             "survivors_with_scores.json").read_text())
        secret = json.loads((head / "secret.json").read_text())
        assert merged["results"][0]["seed"] == secret["secret_seed"], merged["results"][:2]
        summary = json.loads((head / "full_scoring_results" / "run_summary.json").read_text())
        slots = {job["host"].split("@")[0] for job in summary["jobs"]}
        assert slots == {"rig-a.gpu0", "rig-a.gpu1", "rig-b.gpu0"}, slots  # both GPUs worked
        logs = output("coordinator cluster logs rig-a")
        assert "==> worker-rig-a.gpu0.log <==" in logs and "worker-rig-a.gpu1.log" in logs
        down = output("coordinator cluster down --purge")
        assert down.count("stopped worker pid") == 3, down
        for host in hosts_by_label.values():
            assert not list((host.workdir / ".scripts-coordinator").glob("*.env"))
            assert not list((host.workdir / ".scripts-coordinator").glob("*.pid"))
        assert PASSWORD not in json.dumps({c: d.stdout + d.stderr for c, d in walk.ran.items()})
        for host in hosts_by_label.values():
            host.stop()
        wait_for(lambda: processes_under(tmp_path) == [], 30, "every process of the walk gone")
