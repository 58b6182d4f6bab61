"""The architecture holds: imports go one way, head node -> worker -> nothing of ours."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(module: str) -> set[str]:
    code = (f"import sys, {module}; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(out.stdout.split())


@pytest.mark.parametrize(("module", "forbidden"), [
    ("worker_tasks.worker", {"coordinator", "scoring"}),
    # The zygote's state is every warm job's: nothing but what it preloads, no Celery.
    ("worker_tasks.zygote", {"coordinator", "scoring", "celery", "kombu", "redis", "numpy"}),
    # The CLI parses and prints --help before any verb loads its heavy parts.
    ("coordinator.cli", {"celery", "kombu", "redis", "pydantic", "fabric", "paramiko"}),
    # Reading runs and who serves them (runs, status --no-check) starts without Celery.
    ("coordinator.records", {"celery", "kombu", "pydantic", "fabric"}),
    ("coordinator.cluster_view", {"celery", "kombu", "pydantic", "fabric"}),
    ("scoring.worker", {"coordinator", "worker_tasks", "celery"}),
    ("full_scoring_worker", {"coordinator", "worker_tasks", "celery"}),
])
def test_lower_layers_do_not_import_upper_ones(module: str, forbidden: set[str]) -> None:
    assert not imported_after(module) & forbidden


def test_the_python_api_is_importable_from_the_package() -> None:
    import coordinator

    for name in ("submit", "get_run", "Run", "RunStatus", "JobState", "ExitCode"):
        assert hasattr(coordinator, name)


def test_every_promise_break_still_applies() -> None:
    """``tools/break_promises.py``: each break's text is in its file once, each named test
    exists (a stale entry would break nothing and prove nothing)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "tools"))
    try:
        import break_promises
    finally:
        sys.path.remove(str(repo / "tools"))
    stale = [item.promise for item in break_promises.BREAKS
             if (repo / item.path).read_text().count(item.old) != 1]
    missing = [test for item in break_promises.BREAKS for test in item.tests
               if f"def {test.partition('::')[2].split('[')[0]}(" not in
               (repo / test.partition("::")[0]).read_text()]
    assert (stale, missing) == ([], [])


@pytest.mark.parametrize("package", ["coordinator", "worker_tasks"])
def test_no_public_name_is_also_a_submodule(package: str) -> None:
    """The packages export lazily; importing a submodule of the same name would rebind the
    name to the module (``from coordinator import submit`` giving a module)."""
    import importlib
    import pkgutil

    module = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert set(module.__all__) & submodules == set()
    code = (f"import importlib, pkgutil, {package}; "
            f"[importlib.import_module('{package}.' + m.name) "
            f"for m in pkgutil.iter_modules({package}.__path__) if m.name != '__main__']; "
            f"print(all(not isinstance(getattr({package}, name), type({package})) "
            f"for name in {package}.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "True"


def test_each_command_loads_only_its_group_and_the_table_names_every_command() -> None:
    """``coordinator.cli.COMMAND_GROUPS`` is what each group registers, exactly; a command
    line builds the parser of its own group only (and parses as the whole one would)."""
    import argparse

    from coordinator import cli

    def registered(name: str) -> set[str]:
        parser = argparse.ArgumentParser()
        commands = parser.add_subparsers()
        cli.group(name).register(lambda command, *_: commands.add_parser(command))
        return set(commands.choices)

    by_group = {name: registered(name) for name in cli.GROUP_NAMES}
    assert {command: name for name, commands in by_group.items() for command in commands} \
        == cli.COMMAND_GROUPS
    whole = cli.build_parser()
    for command, name in cli.COMMAND_GROUPS.items():
        parser = cli.build_parser(command)
        choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        assert set(choices) == by_group[name]
    assert cli.command_of(["--broker", "redis://x", "status", "RUN"]) == "status"
    assert cli.command_of(["--version"]) is None
    argv = ["submit", "--jobs-file", "j.json", "--dry-run"]
    assert vars(cli.build_parser(cli.command_of(argv)).parse_args(argv)) == \
        vars(whole.parse_args(argv))


def test_runs_and_status_load_no_other_group() -> None:
    code = ("import sys; from coordinator.cli import build_parser; "
            "build_parser('status').parse_args(['status', 'RUN']); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('coordinator.cli.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["coordinator.cli.common", "coordinator.cli.runs"]


# The CLI is a thin face: it parses, calls the run handle, the cluster or the local cluster,
# and renders. Each module of the product it imports is one more thing a verb decides itself.
CLI_IMPORTS_AT_MOST = 16


def product_imports(package_dir: str) -> set[str]:
    """The modules of the product (``coordinator``, ``worker_tasks``, ``scoring``) outside
    ``package_dir`` that its files import, at any depth (``from a import b``, where ``b`` is
    a module, counts as ``a.b``)."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    inside = package_dir.replace("/", ".")
    found = set()
    for path in (repo / package_dir).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" if
                         (repo / node.module.replace(".", "/") / f"{alias.name}.py").exists()
                         else node.module for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found.update(name for name in names
                         if name.split(".")[0] in {"coordinator", "worker_tasks", "scoring"}
                         and not name.startswith(inside))
    return found


def test_the_cli_imports_few_modules_of_the_product() -> None:
    imported = product_imports("coordinator/cli")
    assert len(imported) <= CLI_IMPORTS_AT_MOST, sorted(imported)
    # Nothing of the worker's side or the workload: those are reached through the head's
    # rooms (the run handle, the cluster, the local cluster, this node's worker).
    assert not {name for name in imported if not name.startswith("coordinator")}
