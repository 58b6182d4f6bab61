"""What every command group shares: the parser class, shared flags, error handling.

Every failure prints one line, ``coordinator: error: ...``, and exits with a
status from ``coordinator.errors.ExitCode``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import redis

from coordinator.errors import CoordinatorError, ExitCode

PROG = "coordinator"

EXIT_CODES = """\
exit status:
  0  every job succeeded (or, for submit without --wait, the run was published)
  1  at least one job failed
  2  invalid input (jobs file, inventory, flags); nothing was published
  3  Redis unreachable
  4  unknown run id
  5  --timeout passed before the run finished
  6  a cluster could not start or a node failed (local cluster, SSH node)
  130 interrupted (Ctrl-C)"""

ENVIRONMENT = """\
environment:
  SC_BROKER_URL      Redis broker (default redis://127.0.0.1:6379/0); --broker overrides it
  SC_TRACKING_URL    Redis holding run records (default: the broker)
  SC_CONNECT_TIMEOUT seconds before Redis counts as unreachable (default 3)
  SC_INVENTORY       the cluster inventory (default ./cluster.toml, used when present)"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like invalid input."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.INVALID_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=30)


class CommandFactory(Protocol):
    """Adds one command to the ``coordinator`` parser (see ``cli.build_parser``)."""

    def __call__(self, name: str, help_text: str, example: str) -> argparse.ArgumentParser: ...


def existing_dir(value: str) -> str:
    """An argparse type: the directory must exist (exit 2 otherwise)."""
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is not a directory")
    return value


def add_inventory_flag(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--inventory", metavar="FILE",
                        help=help_text or "cluster inventory (default: $SC_INVENTORY, else "
                                          "./cluster.toml when present); with node-local "
                                          "storage, outputs are fetched from the nodes")


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def run_cli(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace,
            prog: str = PROG) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(handler(args))
    except CoordinatorError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except BrokenPipeError:
        # The reader went away (`coordinator status | head -1`): a normal end for a CLI.
        # Point stdout at /dev/null so the interpreter's final flush says nothing either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)
    except redis.RedisError as err:  # Redis went away after the first contact
        print(f"{prog}: error: lost the connection to Redis: {err}", file=sys.stderr)
        return int(ExitCode.BROKER_UNREACHABLE)
    except OSError as err:  # a file or directory the command needed; no traceback
        print(f"{prog}: error: {err}", file=sys.stderr)
        return int(ExitCode.JOBS_FAILED)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
