"""A job that imports NumPy, then writes its output file: a script with a real start-up cost.

    python benchmarks/numpy_job.py --output-file out/x.json [--sleep S]
"""

import argparse
import json
import time

import numpy as np

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--output-file", required=True)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()
time.sleep(args.sleep)
with open(args.output_file, "w") as out:
    json.dump({"sum": int(np.arange(10).sum())}, out)
