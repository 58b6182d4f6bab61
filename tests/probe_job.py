"""A job script for fault tests: it keeps its own append-only log of executions.

    python tests/probe_job.py --ledger DIR --output-file out/x.json [--sleep S]
        [--fail-attempts N] [--child-sleep S] [--speed NODE=FACTOR,...] [--lock-per-gpu]
        [--until PATH] [--burn S] [--allocate MB]

Each execution appends ``start`` and, if it gets that far, ``end <exit code>`` lines
to ``DIR/<job>.ledger``, and holds two exclusive non-blocking locks while it runs:
``DIR/<job>.lock`` (two copies of one job at once) and ``DIR/node-<node>.lock``
(two jobs of one node at once). A lock it cannot take is written down as
``CONCURRENT job`` / ``CONCURRENT node`` in ``DIR/violations``, so a test can
prove that neither ever happened. ``--fail-attempts N`` fails attempts 1..N
(``SC_ATTEMPT``), for automatic retries. ``--speed`` multiplies the sleep by the
factor of the node running it (``SC_NODE``): a mixed cluster of slow and fast nodes.
``--lock-per-gpu``: the slot lock is per GPU (``CUDA_VISIBLE_DEVICES``), for per-GPU runs.
``--until PATH``: the sleep ends early once PATH exists (a test opens the gate when it has
seen what it waits for, instead of hoping the sleep was long enough).
``--durations S1,S2,...``: the Nth execution of the job (a backup copy counts: executions
are counted in the ledger) sleeps SN seconds, the last for any later one: a straggler
whose copy is fast. ``--fail-executions N`` fails executions 1..N. The output says which
execution wrote it.
Start lines say ``start <attempt> <pid> <time> <node> <gpu>``.
"""

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--ledger", required=True)
parser.add_argument("--output-file", required=True)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--fail-attempts", type=int, default=0)
parser.add_argument("--child-sleep", type=float)
parser.add_argument("--speed", default="", help="NODE=FACTOR,...: sleep longer on slow nodes")
parser.add_argument("--lock-per-gpu", action="store_true")
parser.add_argument("--until", metavar="PATH", help="end the sleep once PATH exists")
parser.add_argument("--burn", type=float, default=0.0, help="busy CPU seconds, in a child "
                    "process it waits for (its whole tree is accounted)")
parser.add_argument("--allocate", type=int, default=0, metavar="MB",
                    help="touch this many MiB of memory in that child")
parser.add_argument("--durations", default="", help="S1,S2,...: the Nth execution sleeps SN")
parser.add_argument("--fail-executions", type=int, default=0)
args = parser.parse_args()

job = os.environ["SC_JOB_ID"]
node = os.environ["SC_NODE"]
attempt = int(os.environ.get("SC_ATTEMPT", "1"))
gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
factors = dict(pair.split("=", 1) for pair in args.speed.split(",") if pair)


def note(name: str, line: str) -> None:
    with open(os.path.join(args.ledger, name), "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def lock(name: str, kind: str) -> object:
    fh = open(os.path.join(args.ledger, name), "a")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        note("violations", f"CONCURRENT {kind} {job} on {node} pid {os.getpid()}")
    return fh


slot = f"{node}-gpu{gpu}" if args.lock_per_gpu else node
held = [lock(f"{job}.lock", "job"), lock(f"node-{slot}.lock", "node")]
note(f"{job}.ledger", f"start {attempt} {os.getpid()} {time.time():.3f} {node} {gpu}")
with open(os.path.join(args.ledger, f"{job}.ledger")) as ledger_fh:
    execution = sum(1 for line in ledger_fh if line.startswith("start "))
if args.durations:
    durations = [float(value) for value in args.durations.split(",")]
    args.sleep = durations[min(execution, len(durations)) - 1]
if args.child_sleep:
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({args.child_sleep})"])
    note(f"{job}.children", str(child.pid))
if args.burn or args.allocate:
    burner = (f"import time; block = bytearray({args.allocate} * 1048576); "
              f"[block.__setitem__(i, 1) for i in range(0, len(block), 4096)]; "
              f"end = time.process_time() + {args.burn}\nwhile time.process_time() < end: pass")
    subprocess.run([sys.executable, "-c", burner], check=True)
sleep_until = time.monotonic() + args.sleep * float(factors.get(node, "1"))
while time.monotonic() < sleep_until and not (args.until and os.path.exists(args.until)):
    time.sleep(min(0.05, max(0.0, sleep_until - time.monotonic())))
code = 1 if attempt <= args.fail_attempts or execution <= args.fail_executions else 0
if code == 0:
    os.makedirs(os.path.dirname(args.output_file) or ".", exist_ok=True)
    with open(args.output_file, "w") as fh:
        json.dump({"job": job, "attempt": attempt, "execution": execution, "node": node}, fh)
else:
    print(f"attempt {attempt} of {job} fails on purpose", flush=True)
note(f"{job}.ledger", f"end {attempt} {code} {time.time():.3f}")
sys.exit(code)
