"""Run a command that dies with the process that started it, even a SIGKILLed one.

    python die_with_parent.py SIGNAL PARENT_PID [--remove DIR] COMMAND [ARG...]

Linux keeps ``PR_SET_PDEATHSIG`` across exec: this process asks for SIGNAL when its
parent dies, checks that the parent is still PARENT_PID (it may have died already),
and becomes COMMAND. ``coordinator local`` starts its Redis and workers this way, so
a coordinator killed with SIGKILL (no handler runs) takes them with it. Run by path,
not as ``-m coordinator...``: it imports nothing of the project (no start-up cost).

``--remove DIR``: instead of becoming COMMAND, stay as its parent, pass SIGNAL on to it,
and once it has exited remove DIR if PARENT_PID is gone (a private Redis's data
directory, which nobody else would remove after a SIGKILL).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # prctl: signal this process when its parent dies
# Exit status when the parent was gone before the command could start.
PARENT_GONE = 125


def wrapped(command: list[str], signum: signal.Signals, remove: str | None = None) -> list[str]:
    """``command`` started through this file: it gets ``signum`` when this process dies
    (and ``remove``, a directory, is removed once it has exited).

    Linux sends the signal when the *thread* that started the child ends: start such
    children from the main thread.
    """
    extra = ["--remove", remove] if remove else []
    return [sys.executable, os.path.abspath(__file__), signum.name, str(os.getpid()), *extra,
            *command]


def die_with_parent(signum: int) -> bool:
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def supervise(command: list[str], signum: signal.Signals, remove: str, parent: int) -> int:
    """Run ``command`` as a child, pass ``signum`` (and SIGTERM) on; once it has exited,
    remove ``remove`` if the parent is gone (a live parent cleans up itself, and may still
    read the directory: a log saying why the command failed to start)."""
    child = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(signal.SIGKILL))

    def forward(received: int, _frame: object) -> None:
        child.send_signal(received)

    for each in {signum, signal.SIGTERM}:
        signal.signal(each, forward)
    status = child.wait()
    if os.getppid() != parent:
        shutil.rmtree(remove, ignore_errors=True)
    return status


def main(argv: list[str]) -> int:
    signum, parent, command = signal.Signals[argv[0]], int(argv[1]), argv[2:]
    remove = None
    if command[:1] == ["--remove"]:
        remove, command = command[1], command[2:]
    if not die_with_parent(int(signum)):
        print(f"die_with_parent: prctl failed: {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)
    elif os.getppid() != parent:
        if remove:
            shutil.rmtree(remove, ignore_errors=True)
        return PARENT_GONE
    if remove:
        return supervise(command, signum, remove, parent)
    os.execvp(command[0], command)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
