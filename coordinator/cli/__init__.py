"""Command line: ``coordinator <command>`` and the drop-in ``scripts-coordinator``.

One module per group of verbs: ``runs`` (submit, status, wait, collect, ...),
``node`` (worker, local), ``cluster`` (the SSH verbs), ``observe`` (flower,
metrics), ``workload`` (jobs files, the demo, examples, shims); ``common`` holds
what they share.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from coordinator.cli import cluster, node, observe, runs, workload
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
from coordinator.cli.node import project_version
from coordinator.errors import ExitCode

GROUPS = (runs, node, cluster, observe, workload)


class VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked (reading the
    package metadata costs every other command 13 ms of its start)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the installed version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser.exit(message=f"scripts-coordinator {project_version()}\n")


def build_parser() -> argparse.ArgumentParser:
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

    for group in GROUPS:
        group.register(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args.handler, args)


def legacy_main(argv: Sequence[str] | None = None) -> int:
    """``scripts-coordinator``: the original tool's command line (submit and follow)."""
    args = runs.build_legacy_parser().parse_args(argv)
    args.wait, args.json = True, False
    return run_cli(runs.cmd_submit, args, prog="scripts-coordinator")


def adapter_main(argv: Sequence[str] | None = None) -> int:
    """``coordinator_adapter.py``: as ``scripts-coordinator``, saying each job's route first."""
    args = runs.build_legacy_parser("coordinator_adapter.py").parse_args(argv)
    args.wait, args.json = True, False
    return run_cli(runs.cmd_adapter, args, prog="coordinator_adapter.py")


if __name__ == "__main__":
    sys.exit(main())
