#!/usr/bin/env python3
"""scripts_coordinator.py: the original coordinator's command line.

Runs scripts-coordinator (this checkout, its .venv). The pipeline's command lines
work unchanged, e.g.:
    python3 scripts_coordinator.py --jobs-file scoring_jobs.json
See `coordinator --help`. A python3 without the project hands over to the one that has it.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The interpreter scripts-coordinator is installed for.
PYTHON = os.path.join(HERE, ".venv", "bin", "python")

sys.path.insert(0, HERE)
try:
    from coordinator.cli import legacy_main
except ImportError as err:
    # Hand over once (never in a loop) to the interpreter that has the project.
    if "SC_SHIM_HANDOVER" not in os.environ and os.path.exists(PYTHON):
        os.environ["SC_SHIM_HANDOVER"] = sys.executable
        os.execv(PYTHON, [PYTHON, os.path.abspath(__file__), *sys.argv[1:]])
    sys.exit(f"scripts_coordinator.py: scripts-coordinator cannot be loaded by "
             f"{sys.executable} ({err}); install it, or run: coordinator shims DIR")

if __name__ == "__main__":
    sys.exit(legacy_main())
