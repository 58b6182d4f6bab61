"""The pipeline's own command lines, unchanged: ``python3 scripts_coordinator.py ...``.

The pipeline this replaces is driven by shell scripts that run files, not console
scripts: ``python3 scripts_coordinator.py --jobs-file scoring_jobs.json`` and
``python3 coordinator_adapter.py --jobs-file ...``. A shim is such a file: it runs
the same code as ``scripts-coordinator``, and when the ``python3`` that runs it is
not the interpreter this project is installed for, it hands itself over to that
one (``os.execv``), so no shell script has to change.

``coordinator shims DIR`` writes the two files into a pipeline's directory, each
naming the interpreter of this installation. Both are ``coordinator/shim.py``, which
runs what its file name says; the two files at the top of the repository are links to
it, naming the checkout's ``.venv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from coordinator import project_version
from coordinator.errors import InvalidJobsError

# The one shim, a script of this package: the checkout's two files are links to it, and a
# pipeline's copies are it with the interpreter named.
SHIM = Path(__file__).with_name("shim.py")
SHIMS = ("scripts_coordinator.py", "coordinator_adapter.py")
# The line that names the interpreter: the checkout's .venv, found at run time.
CHECKOUT_PYTHON = 'PYTHON = os.path.join(HERE, ".venv", "bin", "python")\n'


def render(name: str, python: str | None = None) -> str:
    """The shim ``name``; ``python``: the interpreter it names (None: the checkout's .venv)."""
    if name not in SHIMS:
        raise ValueError(f"no shim is called {name}")
    template = SHIM.read_text(encoding="utf-8")
    if python is None:
        return template
    assert template.count(CHECKOUT_PYTHON) == 1, "the shim names its interpreter once"
    return template.replace(CHECKOUT_PYTHON,
                            f"PYTHON = {python!r}  # scripts-coordinator {project_version()}\n")


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

