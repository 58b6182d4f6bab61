"""Run a command that dies with the process that started it, even a SIGKILLed one.

    python die_with_parent.py SIGNAL PARENT_PID COMMAND [ARG...]

Linux keeps ``PR_SET_PDEATHSIG`` across exec: this process asks for SIGNAL when its
parent dies, checks that the parent is still PARENT_PID (it may have died already),
and becomes COMMAND. ``coordinator local`` starts its Redis and workers this way, so
a coordinator killed with SIGKILL (no handler runs) takes them with it. Run by path,
not as ``-m coordinator...``: it imports nothing of the project (no start-up cost).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl: signal this process when its parent dies
# Exit status when the parent was gone before the command could start.
PARENT_GONE = 125


def wrapped(command: list[str], signum: signal.Signals) -> list[str]:
    """``command`` started through this file: it gets ``signum`` when this process dies.

    Linux sends the signal when the *thread* that started the child ends: start such
    children from the main thread.
    """
    return [sys.executable, os.path.abspath(__file__), signum.name, str(os.getpid()), *command]


def main(argv: list[str]) -> int:
    signum, parent, command = signal.Signals[argv[0]], int(argv[1]), argv[2:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        print(f"die_with_parent: prctl failed: {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)
    elif os.getppid() != parent:
        return PARENT_GONE
    os.execvp(command[0], command)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
