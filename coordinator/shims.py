"""The pipeline's own command lines, unchanged: ``python3 scripts_coordinator.py ...``.

The pipeline this replaces is driven by shell scripts that run files, not console
scripts: ``python3 scripts_coordinator.py --jobs-file scoring_jobs.json`` and
``python3 coordinator_adapter.py --jobs-file ...``. A shim is such a file: it runs
the same code as ``scripts-coordinator``, and when the ``python3`` that runs it is
not the interpreter this project is installed for, it hands itself over to that
one (``os.execv``), so no shell script has to change.

``coordinator shims DIR`` writes the two files into a pipeline's directory, each
naming the interpreter of this installation; the two files at the top of the
repository are the same template, naming the checkout's ``.venv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from coordinator.cli.node import project_version
from coordinator.errors import InvalidJobsError

# file name -> (the entry point in coordinator.cli, what it is)
SHIMS = {
    "scripts_coordinator.py": ("legacy_main", "the original coordinator's command line"),
    "coordinator_adapter.py": ("adapter_main", "script jobs and legacy inline-seed jobs, "
                                               "routes shown"),
}
# In the checkout's own shims: the interpreter is the repository's .venv, found at run time.
CHECKOUT_PYTHON = 'os.path.join(HERE, ".venv", "bin", "python")'

TEMPLATE = '''#!/usr/bin/env python3
"""{name}: {what}.

Runs scripts-coordinator ({origin}). The pipeline's command lines
work unchanged, e.g.:
    python3 {name} --jobs-file scoring_jobs.json
See `coordinator --help`. A python3 without the project hands over to the one that has it.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The interpreter scripts-coordinator is installed for.
PYTHON = {python}

sys.path.insert(0, HERE)
try:
    from coordinator.cli import {entry}
except ImportError as err:
    # Hand over once (never in a loop) to the interpreter that has the project.
    if "SC_SHIM_HANDOVER" not in os.environ and os.path.exists(PYTHON):
        os.environ["SC_SHIM_HANDOVER"] = sys.executable
        os.execv(PYTHON, [PYTHON, os.path.abspath(__file__), *sys.argv[1:]])
    sys.exit(f"{name}: scripts-coordinator cannot be loaded by "
             f"{{sys.executable}} ({{err}}); install it, or run: coordinator shims DIR")

if __name__ == "__main__":
    sys.exit({entry}())
'''


def render(name: str, python: str | None = None) -> str:
    """The shim ``name``; ``python``: the interpreter it names (None: the checkout's .venv)."""
    entry, what = SHIMS[name]
    origin = (f"version {project_version()}, {python}" if python else
              "this checkout, its .venv")
    return TEMPLATE.format(name=name, what=what, entry=entry, origin=origin,
                           python=repr(python) if python else CHECKOUT_PYTHON)


def write_shims(directory: str | Path, python: str | None = None) -> list[Path]:
    """Write both shims into ``directory`` (executable), naming this installation's Python."""
    target = Path(directory)
    if not target.is_dir():
        raise InvalidJobsError(f"{directory}: not a directory")
    python = python or sys.executable
    written = []
    for name in SHIMS:
        path = target / name
        path.write_text(render(name, python), encoding="utf-8")
        path.chmod(0o755)
        written.append(path)
    return written

