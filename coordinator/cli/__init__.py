"""Command line: ``coordinator <command>`` and the drop-in ``scripts-coordinator``.

One module per group of verbs: ``runs`` (submit, status, wait, collect, ...),
``node`` (worker, local), ``cluster`` (the SSH verbs), ``observe`` (flower,
metrics), ``workload`` (jobs files, the demo, examples, shims); ``common`` holds
what they share.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from coordinator.cli.common import (
    ENVIRONMENT,
    EXIT_CODES,
    PROG,
    ArgumentParser,
    Exits,
    exit_rows,
    exit_table,
    formatter,
    run_cli,
)
from coordinator.errors import ExitCode

# The groups of verbs, in --help's order, and the group that registers each command: a
# command line loads only its own group's module (all of them cost every command 25 ms of
# its start); --help, a typo or no command loads them all. tests/test_layout.py checks
# this table against what each group registers.
GROUP_NAMES = ("runs", "node", "cluster", "observe", "workload")
COMMAND_GROUPS = {
    **dict.fromkeys(("submit", "recover", "status", "runs", "wait", "collect", "report",
                     "acct", "log", "cancel", "retry", "move"), "runs"),
    **dict.fromkeys(("worker", "local"), "node"),
    "cluster": "cluster",
    **dict.fromkeys(("flower", "metrics"), "observe"),
    **dict.fromkeys(("demo", "examples", "shims", "jobs", "demo-data"), "workload"),
}
# Options before the command that take a value (``coordinator --broker URL status``).
VALUE_OPTIONS = ("--broker",)


def group(name: str) -> ModuleType:
    return importlib.import_module(f"coordinator.cli.{name}")


def command_of(argv: Sequence[str]) -> str | None:
    """The command a command line names, if the options before it let it be found."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


class VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked (reading the
    package metadata costs every other command 13 ms of its start)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the installed version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from coordinator import project_version

        parser.exit(message=f"scripts-coordinator {project_version()}\n")


def build_parser(command_name: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command_name`` (a known command), only its group."""
    parser = ArgumentParser(
        prog=PROG, formatter_class=formatter,
        description="Fan GPU script jobs out over per-node Celery queues; success is a "
                    ".done file.",
        epilog="examples:\n"
               "  coordinator demo                                          # Step 3 demo, here\n"
               "  coordinator examples . && coordinator local --jobs-file \\\n"
               "      examples/hello_jobs.json                              # all on this machine\n"
               "  coordinator cluster up                                    # workers over SSH\n"
               "  coordinator worker --node rig-a                          # or by hand, per node\n"
               "  coordinator submit --jobs-file scoring_jobs.json --wait   # from the head node\n"
               "  coordinator status                                        # newest run\n"
               "  coordinator retry --wait                                  # failed jobs again\n"
               "  coordinator COMMAND --help                                # each command\n\n"
               + EXIT_CODES + "\n\n" + ENVIRONMENT,
    )
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--broker", metavar="URL",
                        help="Redis URL of the broker (default: $SC_BROKER_URL or local)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # --broker is accepted after the command too (`coordinator status RUN --broker URL`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", metavar="URL", default=argparse.SUPPRESS,
                        help="Redis URL of the broker (default: $SC_BROKER_URL or local)")

    def command(name: str, help_text: str, example: str,
                exits: Exits) -> argparse.ArgumentParser:
        # --broker only where it means something: a command that can find Redis unreachable.
        reaches_redis = int(ExitCode.BROKER_UNREACHABLE) in exit_rows(exits)
        return commands.add_parser(name, help=help_text, description=help_text,
                                   epilog=f"example:\n  {example}\n\n{exit_table(exits)}",
                                   formatter_class=formatter,
                                   parents=[common] if reaches_redis else [])

    only = COMMAND_GROUPS.get(command_name or "")
    for name in (only,) if only else GROUP_NAMES:
        group(name).register(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    return run_cli(args.handler, args)


def legacy_main(argv: Sequence[str] | None = None) -> int:
    """``scripts-coordinator``: the original tool's command line (submit and follow)."""
    runs = group("runs")
    args = runs.build_legacy_parser().parse_args(argv)
    args.wait, args.json = True, False
    return run_cli(runs.cmd_submit, args, prog="scripts-coordinator")


def adapter_main(argv: Sequence[str] | None = None) -> int:
    """``coordinator_adapter.py``: as ``scripts-coordinator``, saying each job's route first."""
    runs = group("runs")
    args = runs.build_legacy_parser("coordinator_adapter.py").parse_args(argv)
    args.wait, args.json = True, False
    return run_cli(runs.cmd_adapter, args, prog="coordinator_adapter.py")


if __name__ == "__main__":
    sys.exit(main())
