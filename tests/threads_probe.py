"""A job script that sets a thread count in its own environment before it imports a module
the worker preloads, as HPC scripts do, and reports whether that module was imported already
(``colorsys``: the suite's warm workers preload it).

    python tests/threads_probe.py --output-file out/x.json
"""

import os
import sys

os.environ["OMP_NUM_THREADS"] = "1"  # read by NumPy's BLAS as it loads: before the import
imported_before = "colorsys" in sys.modules

import colorsys  # noqa: E402,F401
import json  # noqa: E402

with open(sys.argv[sys.argv.index("--output-file") + 1], "w") as out:
    json.dump({"imported_before": imported_before,
               "warm": "worker_tasks.runner" in sys.modules}, out)
