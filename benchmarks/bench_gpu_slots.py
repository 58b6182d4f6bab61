"""GPU slots: a node with two GPUs, one job at a time per node (default) or per GPU.

    python benchmarks/bench_gpu_slots.py [--candidates 400000] [--nodes 4] [--gpus 2]

Two workloads, each run both ways on a local cluster (``coordinator local`` and
``coordinator local --per-gpu``), the same jobs file for both:

* the Step 3 demo: ``demo-data`` then ``jobs scoring --nodes rig-a:2,...`` (36
  chunks, ``gpu_id`` 0 and 1 dealt round-robin), scored by the real script. On
  a machine without GPUs the scoring runs on the CPU cores, which both modes
  share, so the per-GPU mode cannot win much there;
* the same 36 jobs as GPU-bound work stands in for them on a machine with
  GPUs: each job holds its GPU for 0.5 s and leaves the CPU idle.

It prints each makespan and the per-GPU mode's speed-up (the baseline is the
default mode, in the same run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def coordinator(*args: str, cwd: Path) -> None:
    subprocess.run([str(BIN / "coordinator"), *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def makespan(jobs_file: Path, work: Path, per_gpu: bool, tag: str) -> float:
    output = f"results_{tag}_{'per_gpu' if per_gpu else 'per_node'}"
    coordinator("local", "--jobs-file", str(jobs_file), "--output-dir", output,
                "--scripts-dir", str(REPO), *(["--per-gpu"] if per_gpu else []), cwd=work)
    summary = json.loads((work / output / "run_summary.json").read_text())
    assert summary["all_succeeded"], summary["counts"]
    return float(summary["makespan_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=400_000)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=2)
    args = parser.parse_args()
    nodes = ",".join(f"rig-{chr(ord('a') + i)}:{args.gpus}" for i in range(args.nodes))
    with tempfile.TemporaryDirectory(prefix="sc-slots-") as tmp:
        work = Path(tmp)
        coordinator("demo-data", "--out-dir", ".", "--candidates", str(args.candidates),
                    "--draws", "100", cwd=work)
        coordinator("jobs", "scoring", "--survivors", "survivors.json", "--train-history",
                    "train_history.json", "--nodes", nodes, "--chunks", "36", "--prng-type",
                    "java_lcg", "--mod", "1000", "--jobs-file", "scoring_jobs.json", cwd=work)
        scoring = work / "scoring_jobs.json"
        held = work / "held_jobs.json"
        held.write_text(json.dumps([
            {"job_id": job["job_id"], "script": "examples/write_output.py",
             "args": ["--output-file", f"held/{job['job_id']}.json", "--sleep", "0.5"],
             "node": job["node"], "gpu_id": job["gpu_id"]}
            for job in json.loads(scoring.read_text())]))
        rows = []
        for name, jobs_file in (("Step 3 demo, scored on the CPU", scoring),
                                ("36 jobs holding a GPU for 0.5 s", held)):
            started = time.perf_counter()
            per_node = makespan(jobs_file, work, per_gpu=False, tag=jobs_file.stem)
            per_gpu = makespan(jobs_file, work, per_gpu=True, tag=jobs_file.stem)
            rows.append((name, per_node, per_gpu, time.perf_counter() - started))
    print(f"{args.nodes} nodes x {args.gpus} GPUs, 36 jobs, gpu_id dealt round-robin")
    print(f"{'workload':<34} {'per node s':>11} {'per GPU s':>10} {'speed-up':>9}")
    for name, per_node, per_gpu, _ in rows:
        print(f"{name:<34} {per_node:>11.2f} {per_gpu:>10.2f} {per_node / per_gpu:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
