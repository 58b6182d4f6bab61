"""What every command group shares: the parser class, shared flags, error handling.

Every failure prints one line, ``coordinator: error: ...``, and exits with a
status from ``coordinator.errors.ExitCode``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

from coordinator.errors import CoordinatorError, ExitCode, InvalidJobsError

PROG = "coordinator"

# What each exit status means where a command says nothing more specific.
EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.JOBS_FAILED: "at least one job failed (or was cancelled, or is lost)",
    ExitCode.INVALID_INPUT: "invalid input (flags, files); nothing was done",
    ExitCode.BROKER_UNREACHABLE: "Redis unreachable (within $SC_CONNECT_TIMEOUT)",
    ExitCode.RUN_NOT_FOUND: "unknown run id (expired, or a typo)",
    ExitCode.WAIT_TIMEOUT: "--timeout passed before the run finished (it goes on)",
    ExitCode.CLUSTER_FAILED: "a cluster could not start or a node failed",
    ExitCode.UNCONFIRMED: "no job failed, but a .done is not where the collector looked "
                          "(its line says where the workers wrote; see --workdir)",
    ExitCode.NO_WORKER: "no worker served the run's waiting jobs for --no-worker-timeout "
                        "seconds (the run goes on; start a worker, or name another broker)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGTERM)",
}
# Where --help's exit table wraps its lines.
HELP_WIDTH = 92
# The statuses a command ends with: a code (its common meaning) or (code, its own meaning).
Exits = Sequence[ExitCode | tuple[ExitCode, str]]
# Every command can be given bad flags, and interrupted.
EVERY_COMMAND = (ExitCode.INVALID_INPUT, ExitCode.INTERRUPTED)


def exit_rows(exits: Exits) -> dict[int, str]:
    """status -> meaning, for ``exits`` and what every command can end with."""
    rows = {int(code): EXIT_MEANINGS[code] for code in EVERY_COMMAND}
    for entry in exits:
        code, text = (entry, EXIT_MEANINGS[entry]) if isinstance(entry, ExitCode) else entry
        rows[int(code)] = text
    return dict(sorted(rows.items()))


def exit_table(exits: Exits) -> str:
    """A command's ``exit status:`` section of ``--help``: only what it can end with."""
    return "exit status:\n" + "\n".join(
        textwrap.fill(text, width=HELP_WIDTH, initial_indent=f"  {code:<4}",
                      subsequent_indent=" " * 6) for code, text in exit_rows(exits).items())


# `coordinator --help`: every status any command uses.
EXIT_CODES = exit_table(list(ExitCode)) + "\n  (each command's --help lists its own)"

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

    def __call__(self, name: str, help_text: str, example: str,
                 exits: Exits) -> argparse.ArgumentParser: ...


def require(modules: Sequence[str], extra: str, what: str) -> None:
    """One line and exit 2 when an optional dependency is missing (before anything imports it):
    ``what`` needs ``modules``, which ``pip install 'scripts-coordinator[EXTRA]'`` brings."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise InvalidJobsError(f"{what}: {', '.join(missing)} not installed; "
                               f"pip install 'scripts-coordinator[{extra}]'")


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


class _NeverRaised(Exception):
    """Stands for redis-py's error class in a command that never loaded redis-py."""


def redis_error() -> type[Exception]:
    """redis-py's ``RedisError`` once it is loaded (only then can a command have raised it);
    looked up when an exception is handled, so a quick verb never imports redis-py."""
    module = sys.modules.get("redis")
    return module.RedisError if module is not None else _NeverRaised


def kombu_error() -> type[Exception]:
    """kombu's ``OperationalError`` (publishing, or asking the workers, on a broker that went
    away) once kombu is loaded, as ``redis_error`` does for redis-py."""
    module = sys.modules.get("kombu.exceptions")
    return module.OperationalError if module is not None else _NeverRaised


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
    except (redis_error(), kombu_error()) as err:  # Redis went away after the first contact
        print(f"{prog}: error: lost the connection to Redis: {err}", file=sys.stderr)
        return int(ExitCode.BROKER_UNREACHABLE)
    except OSError as err:  # a file or directory the command needed; no traceback
        print(f"{prog}: error: {err}", file=sys.stderr)
        return int(ExitCode.JOBS_FAILED)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


def speeds_line(script: str, speeds: dict[str, Any]) -> str:
    """``speeds of S: rig-a 1.00 (0.52 s/unit, 12 jobs), rig-b 0.49 (...)``, fastest first."""
    ranked = sorted(speeds.items(), key=lambda item: (-item[1].speed, item[0]))
    return f"speeds of {script}: " + ", ".join(
        f"{slot} {speed.speed:.2f} ({speed.seconds_per_unit:.3g} s/unit, {speed.samples} "
        f"jobs)" for slot, speed in ranked)


def add_warm_flags(parser: argparse.ArgumentParser, preload: bool = True) -> None:
    """``--warm`` (the default) and ``--cold``; and ``--preload`` where the user picks it."""
    temper = parser.add_mutually_exclusive_group()
    temper.add_argument("--warm", action="store_true",
                        help="the default: fork each job's interpreter from a warm parent that "
                             "has imported its preload once (no interpreter start per job; a job "
                             "says \"warm\": false to start fresh); a failed preload is one "
                             "line in the worker log, and jobs then run cold")
    temper.add_argument("--cold", action="store_true",
                        help="start each job's interpreter fresh, as a shell would (no warm "
                             "parent: for scripts that must not share one, e.g. --cold when a "
                             "preloaded module misbehaves after fork)")
    if not preload:
        return
    parser.add_argument("--preload", metavar="MODULES", type=module_list,
                        help="the modules the warm parent imports, comma-separated (default: "
                             "numpy,scoring.warm_engines, the Step 3 script's engines), e.g. "
                             "--preload numpy,torch")


def module_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not all(part.isidentifier() for part in name.split("."))]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r} is not a module name")
    return names
