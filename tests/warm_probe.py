"""A job script that reports what its interpreter looks like, for warm versus cold tests.

    python tests/warm_probe.py --output-file out/x.json [--exit N] [--raise] [--exit-text T]
        [--segfault] [--leave-state] [--sleep S] [--child-sleep S] [--unclosed]
        [--excepthook] [--interrupt] [--daemon]

The report (the output file): ``__name__``, ``sys.argv``, ``sys.path[0]``, the working
directory, the environment, the open descriptors, the threads, whether it was forked warm
(the zygote's modules are loaded), its runner's pid, and what an earlier job may have left
behind (a mark on
the preloaded ``json`` module, the ``wave`` module, a variable), and whether ``colorsys``
(preloaded by the suite) is loaded. ``--leave-state`` leaves
all of those behind, plus an open file and a thread. The exit options end it the ways a
script can end: a status, an uncaught exception, ``sys.exit(text)``, a segfault.
``--interrupt`` ends it with an uncaught ``KeyboardInterrupt``. ``--excepthook`` sets a
``sys.excepthook`` that prints one line of its own.
``--unclosed`` writes "kept" into files it never closes, which only the interpreter's exit
writes out: one held by the script's globals (which its functions refer to), a gzip file
(whose trailer only its close writes), one held by a module it imported, one held by the
preloaded ``json`` module, and a binary gzip file held by it too; and a global whose
``__del__`` writes "kept" into its file. ``--daemon`` starts a
daemon thread first, which is still running (asleep) as the script ends.
"""

import sys

warm = "worker_tasks.runner" in sys.modules  # the zygote's; before this script imports any
left_before = {"json_mark": getattr(sys.modules.get("json"), "MARK", None),
               "wave_loaded": "wave" in sys.modules, "colorsys_loaded": "colorsys" in sys.modules}

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--output-file", required=True)
parser.add_argument("--exit", type=int)
parser.add_argument("--raise", dest="raise_", action="store_true")
parser.add_argument("--exit-text")
parser.add_argument("--segfault", action="store_true")
parser.add_argument("--leave-state", action="store_true")
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--child-sleep", type=float)
parser.add_argument("--unclosed", action="store_true")
parser.add_argument("--excepthook", action="store_true")
parser.add_argument("--interrupt", action="store_true")
parser.add_argument("--daemon", action="store_true")
args = parser.parse_args()

report = {
    "name": __name__, "argv": sys.argv, "orig_argv": sys.orig_argv, "path0": sys.path[0],
    "cwd": os.getcwd(),
    "env": dict(os.environ), "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "threads": threading.active_count(), "warm": warm, "runner": os.getppid(),
    "leftover_env": os.environ.get("LEFT_BY_EARLIER_JOB"), **left_before,
    "loader": type(__loader__).__name__, "package": __package__, "spec": __spec__,  # noqa: F821
}
if args.leave_state:
    json.MARK = os.environ["SC_JOB_ID"]
    import wave  # noqa: F401
    os.environ["LEFT_BY_EARLIER_JOB"] = "1"
    leaked = open(os.devnull)  # noqa: SIM115 (left open on purpose)
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
if args.child_sleep:
    subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({args.child_sleep})"])
if args.excepthook:
    sys.excepthook = lambda kind, error, tb: print(f"the probe's hook: {kind.__name__}: {error}")
if args.daemon:
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
if args.unclosed:
    import gzip
    import wave

    def unclosed(kind, opener=open):  # a function: it and the globals refer to each other
        return opener(f"{args.output_file}.{kind}", "wt")

    held_by_main = unclosed("main")
    held_by_main.write("kept\n")
    gzipped = unclosed("gz", gzip.open)
    gzipped.write("kept\n")
    wave.HELD = unclosed("imported")
    wave.HELD.write("kept\n")
    json.HELD = unclosed("preloaded")
    json.HELD.write("kept\n")
    json.GZIPPED = gzip.open(f"{args.output_file}.gzb", "wb")  # noqa: SIM115 (left open)
    json.GZIPPED.write(b"kept\n")

    class Farewell:  # a global whose __del__ writes: a cold exit frees it as it clears __main__
        def __init__(self, path):
            self.out = open(path, "w")  # noqa: SIM115 (written and closed by __del__)

        def __del__(self):
            self.out.write("kept\n")
            self.out.close()

    farewell = Farewell(f"{args.output_file}.del")
time.sleep(args.sleep)
with open(args.output_file, "w") as out:
    json.dump(report, out)
print(f"probe {os.environ['SC_JOB_ID']} warm={warm}", flush=True)
if args.exit is not None:
    sys.exit(args.exit)
if args.raise_:
    raise ValueError("the probe raised on purpose")
if args.interrupt:
    raise KeyboardInterrupt
if args.exit_text:
    sys.exit(args.exit_text)
if args.segfault:
    ctypes.string_at(0)
