"""Each command's --help lists the exit statuses it can end with, and each listed one is reached:
here by running the command into it, or by the test named in ``ELSEWHERE``."""

from __future__ import annotations

import argparse
import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import submit
from coordinator.cli import build_parser
from coordinator.local import LocalCluster
from coordinator.redis_server import free_port
from tests.helpers import REPO, echo_job, run_cli, write_jobs

# Every command line with --help (the cluster verbs and `jobs scoring` are their own).
COMMANDS = [name for name in build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
            if name not in ("cluster", "jobs")] + [
    "cluster init", "cluster deploy", "cluster up", "cluster status", "cluster logs",
    "cluster down", "cluster unit", "jobs scoring"]
# Statuses reached by other tests (the tests are named; this file checks they exist).
ELSEWHERE = {
    ("submit", 6): "test_ssh_cluster.py::test_a_balanced_step3_run_comes_home_from_whichever"
                   "_node_ran_each_chunk",
    ("wait", 3): "test_faults.py::test_wait_reports_a_broker_gone_for_good_as_exit_3",
    ("local", 0): "test_scoring_pipeline.py::test_local_demo_finds_the_secret_seed",
    ("local", 6): "test_promises.py::test_exit_6_when_the_local_cluster_cannot_start",
    ("demo", 0): "test_install.py::test_the_demo_runs_from_any_directory",
    ("cluster", 0): "test_ssh_cluster.py::test_step3_over_ssh_from_init_to_down",
    ("cluster", 3): "test_ssh_cluster.py::test_a_broker_password_from_the_environment_never_shows",
    ("cluster", 6): "test_ssh_cluster.py::test_up_reports_each_failed_node_in_one_line_and_starts"
                    "_the_others",
}
# Statuses a command ends with through another command's code (the same function).
SAME_CODE = {
    **{("recover", code): "cmd_submit, as submit" for code in (1, 5, 6, 7, 8)},
    **{("retry", code): "follow(), as wait" for code in (1, 5, 7, 8)},
    **{("demo", code): "cmd_local's status, as local" for code in (1, 6)},
    ("flower", 0): "Flower's own status: the command replaces itself with Flower",
}


def subparser(command: str) -> argparse.ArgumentParser:
    """The real parser of a command line (``cluster up``, ``jobs scoring``)."""
    parser: argparse.ArgumentParser = build_parser()
    for word in command.split():
        action = next(action for action in parser._actions  # noqa: SLF001
                      if isinstance(action, argparse._SubParsersAction))  # noqa: SLF001
        parser = action.choices[word]
    return parser


@functools.cache
def listed(command: str) -> frozenset[int]:
    """The statuses in the command's --help table (the parser's own help text)."""
    table = subparser(command).format_help().split("exit status:\n", 1)[1]
    return frozenset(int(match) for match in re.findall(r"^  (\d+) ", table, re.MULTILINE))


def test_every_command_lists_2_and_130_and_refuses_a_bad_flag_with_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        assert {2, 130} <= listed(command), command
        with pytest.raises(SystemExit) as stopped:
            build_parser().parse_args([*command.split(), "--no-such-flag"])
        assert stopped.value.code == 2, command
        error = capsys.readouterr().err
        assert error.count("\n") == 1, (command, error)
    # The same through the installed command, once.
    result = run_cli("status", "--no-such-flag")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "exit status:" in run_cli("status", "--help").stdout


def test_the_tests_named_for_other_statuses_exist() -> None:
    for (command, code), where in ELSEWHERE.items():
        path, name = where.split("::")
        tree = ast.parse((REPO / "tests" / path).read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in names, (command, code, where)
        group = "cluster" if command == "cluster" else command
        assert code in listed(group if group != "cluster" else "cluster up"), (command, code)


@pytest.fixture(scope="module")
def runs(cluster: LocalCluster, cluster_workdir: Path) -> Iterator[dict[str, str]]:
    """A run that succeeded, one with a failed job, one whose job waits (no worker serves it)."""
    ok = submit([echo_job("exit_ok", "rig-a", "exits")], output_dir="exits",
                workdir=cluster_workdir, broker_url=cluster.broker_url)
    bad = submit([echo_job("exit_bad", "rig-b", "exits", "--exit-code", "2")],
                 output_dir="exits_bad", workdir=cluster_workdir, broker_url=cluster.broker_url)
    pending = submit([echo_job("exit_wait", "rig-nobody", "exits")], output_dir="exits_wait",
                     workdir=cluster_workdir, broker_url=cluster.broker_url)
    ok.wait(timeout=120)
    bad.wait(timeout=120)
    yield {"ok": ok.id, "bad": bad.id, "pending": pending.id}
    pending.cancel()


def test_each_run_command_reaches_each_status_it_lists(
        cluster: LocalCluster, runs: dict[str, str], tmp_path: Path) -> None:
    good = ["--broker", cluster.broker_url]
    dead = ["--broker", f"redis://127.0.0.1:{free_port()}/0"]
    jobs = str(write_jobs(tmp_path / "jobs.json", [echo_job("exit_sub", "rig-c", "exits_sub")]))
    failing = str(write_jobs(tmp_path / "failing.json", [
        echo_job("exit_fail", "rig-c", "exits_fail", "--exit-code", "3")]))
    slow = str(write_jobs(tmp_path / "slow.json", [
        echo_job("exit_slow", "rig-c", "exits_slow", "--sleep", "60")]))
    waits = str(write_jobs(tmp_path / "waits.json", [echo_job("exit_w", "rig-nobody", "w")]))
    unknown = "20000101-000000-000000"
    # A node that keeps its files on its own disk, and no SSH server where it says.
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(f'[defaults]\nworkdir = "/srv/none"\nscripts_dir = "/srv/none"\n'
                           f'[nodes.rig-a]\nhost = "127.0.0.9"\nport = {free_port()}\n'
                           f'connect_timeout = 2\n')
    cases: dict[tuple[str, int], list[str]] = {
        ("submit", 0): ["submit", "--jobs-file", jobs, "--output-dir", "exits_sub", *good],
        ("submit", 1): ["submit", "--jobs-file", failing, "--wait", *good],
        ("submit", 3): ["submit", "--jobs-file", jobs, *dead],
        ("submit", 5): ["submit", "--jobs-file", waits, "--wait", "--timeout", "0.5", *good],
        ("submit", 8): ["submit", "--jobs-file", waits, "--wait", "--no-worker-timeout", "1",
                        *good],
        ("submit", 7): ["submit", "--jobs-file", jobs, "--output-dir", "exits_sub7", "--wait",
                        "--workdir", str(tmp_path), *good],
        ("recover", 0): ["recover", "--jobs-file", jobs, "--output-dir", "exits_sub", *good],
        ("recover", 3): ["recover", "--jobs-file", jobs, *dead],
        ("status", 0): ["status", runs["ok"], *good],
        ("status", 1): ["status", runs["bad"], *good],
        ("status", 3): ["status", *dead],
        ("status", 4): ["status", unknown, *good],
        ("runs", 0): ["runs", *good],
        ("runs", 3): ["runs", *dead],
        ("wait", 0): ["wait", runs["ok"], *good],
        ("wait", 1): ["wait", runs["bad"], *good],
        ("wait", 4): ["wait", unknown, *good],
        ("wait", 5): ["wait", runs["pending"], "--timeout", "0.5", *good],
        ("wait", 8): ["wait", runs["pending"], "--no-worker-timeout", "1", *good],
        ("wait", 7): ["wait", runs["ok"], "--workdir", str(tmp_path), *good],
        ("collect", 0): ["collect", runs["ok"], *good],
        ("collect", 1): ["collect", runs["bad"], *good],
        ("collect", 3): ["collect", *dead],
        ("collect", 4): ["collect", unknown, *good],
        ("collect", 7): ["collect", runs["ok"], "--workdir", str(tmp_path), *good],
        ("report", 0): ["report", runs["ok"], "--out", str(tmp_path / "r.html"), *good],
        ("report", 3): ["report", *dead],
        ("report", 4): ["report", unknown, *good],
        ("acct", 0): ["acct", runs["ok"], *good],
        ("acct", 3): ["acct", *dead],
        ("acct", 4): ["acct", unknown, *good],
        ("log", 0): ["log", runs["ok"], "exit_ok", *good],
        ("log", 3): ["log", unknown, "exit_ok", *dead],
        ("log", 4): ["log", unknown, "exit_ok", *good],
        ("log", 6): ["log", runs["ok"], "exit_ok", "--inventory", str(unreachable), *good],
        ("cancel", 0): ["cancel", runs["ok"], *good],
        ("cancel", 3): ["cancel", *dead],
        ("cancel", 4): ["cancel", unknown, *good],
        ("retry", 0): ["retry", runs["ok"], *good],
        ("retry", 3): ["retry", *dead],
        ("retry", 4): ["retry", unknown, *good],
        ("move", 0): ["move", runs["ok"], "--from", "rig-a", "--to", "rig-b", *good],
        ("move", 3): ["move", "--from", "rig-a", "--to", "rig-b", *dead],
        ("move", 4): ["move", unknown, "--from", "rig-a", "--to", "rig-b", *good],
        ("worker", 0): ["worker", "--node", "rig-exit", "--status"],
        ("worker", 2): ["worker", "--node", "rig-a", *good],  # rig-a is served already
        ("worker", 3): ["worker", "--node", "rig-exit", *dead],
        ("worker", 6): ["worker", "--node", "rig-exit", "--detach", "--loglevel", "NOPE", *good],
        ("flower", 2): ["flower", "--address", "0.0.0.0", *good],
        ("flower", 3): ["flower", *dead],
        ("metrics", 0): ["metrics", "--textfile", str(tmp_path / "m.prom"), *good],
        ("metrics", 3): ["metrics", "--textfile", str(tmp_path / "m.prom"), *dead],
        ("local", 1): ["local", "--jobs-file", failing, "--workdir", str(tmp_path)],
        ("local", 5): ["local", "--jobs-file", slow, "--workdir", str(tmp_path), "--timeout",
                       "1"],
        ("examples", 0): ["examples", str(tmp_path)],
        ("shims", 0): ["shims", str(tmp_path)],
        ("demo-data", 0): ["demo-data", "--out-dir", str(tmp_path / "d"), "--candidates", "50"],
        ("jobs scoring", 0): [
            "jobs", "scoring", "--survivors", str(tmp_path / "d" / "survivors.json"),
            "--train-history", str(tmp_path / "d" / "train_history.json"), "--nodes", "rig-a",
            "--chunks", "2", "--prng-type", "java_lcg", "--mod", "1000",
            "--jobs-file", str(tmp_path / "s.json"), "--chunk-dir", str(tmp_path / "chunks")],
    }
    reached: set[tuple[str, int]] = set()
    for (command, code), argv in cases.items():
        result = run_cli(*argv, cwd=tmp_path)
        assert result.returncode == code, (command, code, result.stdout, result.stderr)
        reached.add((command, code))
    for command in COMMANDS:
        group = "cluster" if command.startswith("cluster ") else command
        for code in listed(command) - {2, 130}:
            assert ((group, code) in reached or (group, code) in ELSEWHERE
                    or (group, code) in SAME_CODE), f"{command}: exit {code} is reached nowhere"
