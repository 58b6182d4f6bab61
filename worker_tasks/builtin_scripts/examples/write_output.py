"""A tiny job script: writes a JSON output file, like a real Step script would.

    python write_output.py --output-file out/x.json [--sleep S] [--exit-code N]
        [--no-output] [--invalid-json] [--fail-unless-exists PATH] [--record FILE]
        [--child-sleep S] [--reason TEXT]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--output-file", required=True)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--exit-code", type=int, default=0)
parser.add_argument("--no-output", action="store_true", help="exit without writing the output")
parser.add_argument("--invalid-json", action="store_true")
parser.add_argument("--fail-unless-exists", metavar="PATH",
                    help="exit 1 unless PATH exists (a condition fixed before a retry)")
parser.add_argument("--record", help="append start/end times here (for overlap checks)")
parser.add_argument("--child-sleep", type=float, metavar="S",
                    help="start a child process that sleeps S seconds (is it killed with us?)")
parser.add_argument("--reason", metavar="TEXT",
                    help="write TEXT to stderr last (a failing script's own reason)")
args, rest = parser.parse_known_args()

if args.child_sleep:
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({args.child_sleep})",
                              "write_output-child"])
    print(f"child pid {child.pid}", flush=True)

started = time.time()
print(f"job on {socket.gethostname()} with CUDA_VISIBLE_DEVICES="
      f"{os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)
time.sleep(args.sleep)
if args.fail_unless_exists and not os.path.exists(args.fail_unless_exists):
    print(f"{args.fail_unless_exists} is missing", flush=True)
    sys.exit(1)
if not args.no_output:
    os.makedirs(os.path.dirname(args.output_file) or ".", exist_ok=True)
    with open(args.output_file, "w") as fh:
        if args.invalid_json:
            fh.write("{not json")
        else:
            json.dump({"job": os.environ.get("SC_JOB_ID"), "args": rest,
                       "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}, fh)
if args.record:
    with open(args.record, "a") as fh:
        fh.write(json.dumps({"job": os.environ.get("SC_JOB_ID"),
                             "node": os.environ.get("SC_NODE"),
                             "start": started, "end": time.time()}) + "\n")
if args.reason:
    print(args.reason, file=sys.stderr, flush=True)
sys.exit(args.exit_code)
