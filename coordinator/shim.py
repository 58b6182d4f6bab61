#!/usr/bin/env python3
"""The pipeline's own command lines: scripts_coordinator.py and coordinator_adapter.py.

This one file is both. Its name says which it is: ``scripts_coordinator.py`` runs the
original coordinator's command line (``scripts-coordinator``), ``coordinator_adapter.py``
takes script jobs and legacy inline-seed jobs with their routes shown. The pipeline's
command lines work unchanged, e.g.:
    python3 scripts_coordinator.py --jobs-file scoring_jobs.json
See `coordinator --help`. A python3 without the project hands over to the one that has it.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The interpreter scripts-coordinator is installed for.
PYTHON = os.path.join(HERE, ".venv", "bin", "python")
# The entry point in coordinator.cli each name runs.
ENTRIES = {"scripts_coordinator.py": "legacy_main", "coordinator_adapter.py": "adapter_main"}


def main() -> None:
    name = os.path.basename(__file__)
    sys.path.insert(0, HERE)
    try:
        from coordinator import cli
    except ImportError as err:
        # Hand over once (never in a loop) to the interpreter that has the project.
        if "SC_SHIM_HANDOVER" not in os.environ and os.path.exists(PYTHON):
            os.environ["SC_SHIM_HANDOVER"] = sys.executable
            os.execv(PYTHON, [PYTHON, os.path.abspath(__file__), *sys.argv[1:]])
        sys.exit(f"{name}: scripts-coordinator cannot be loaded by {sys.executable} ({err}); "
                 f"install it, or run: coordinator shims DIR")
    sys.exit(getattr(cli, ENTRIES.get(name, "legacy_main"))())


if __name__ == "__main__":
    main()
