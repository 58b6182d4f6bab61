"""A job script that imports only the standard library, none of the suite's preload: a warm
worker forks it from its bare zygote.

    python tests/bare_probe.py --output-file out/x.json

The report (the output file): whether it was forked warm (the zygote's own modules are
loaded), whether the suite's preloaded ``colorsys`` is, and which process forked its runner.
"""

import os
import sys

warm = "worker_tasks.runner" in sys.modules  # the zygote's; before this script imports any
preloaded = "colorsys" in sys.modules
with open(f"/proc/{os.getppid()}/stat") as stat:  # its runner's parent: the zygote
    zygote = int(stat.read().rsplit(")", 1)[1].split()[1])
with open(sys.argv[sys.argv.index("--output-file") + 1], "w") as out:
    out.write(f'{{"warm": {str(warm).lower()}, "preloaded": {str(preloaded).lower()}, '
              f'"zygote": {zygote}}}\n')
