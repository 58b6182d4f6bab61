"""Dispatch overhead: a run through Redis + Celery against running the scripts directly.

    python benchmarks/bench_dispatch.py [--jobs 72] [--nodes 4] [--sleep 0.2]

Both sides run the same script (examples/write_output.py, sleeping --sleep s)
the same number of times with the same parallelism (one at a time per node):
  * baseline: a thread per node starting the scripts with subprocess, no broker;
  * coordinator: a LocalCluster (private Redis, one Celery worker per node),
    submit, wait, collect, with the .done rule and tracking.
It prints both makespans, jobs per second and the overhead per job.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator import submit  # noqa: E402
from coordinator.local import LocalCluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "write_output.py"


def jobs_for(count: int, nodes: list[str], sleep: float) -> list[dict]:
    return [{"job_id": f"job_{i:04d}", "script": "examples/write_output.py",
             "args": ["--output-file", f"out/job_{i:04d}.json", "--sleep", str(sleep)],
             "node": nodes[i % len(nodes)]} for i in range(count)]


def direct(jobs: list[dict], nodes: list[str], work: Path) -> float:
    def run_node(node: str) -> None:
        for job in jobs:
            if job["node"] == node:
                subprocess.run([sys.executable, str(SCRIPT), *job["args"]], cwd=work,
                               check=True, stdout=subprocess.DEVNULL)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(run_node, nodes))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=72)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.2)
    args = parser.parse_args()
    nodes = [f"rig-{chr(ord('a') + i)}" for i in range(args.nodes)]
    jobs = jobs_for(args.jobs, nodes, args.sleep)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "direct").mkdir()
        baseline = direct(jobs, nodes, work / "direct")
        with LocalCluster(nodes, scripts_dir=REPO, workdir=work / "cluster",
                          log_dir=work / "logs") as cluster:
            start = time.perf_counter()
            run = submit(jobs, output_dir="out", broker_url=cluster.broker_url,
                         workdir=work / "cluster")
            run.wait(timeout=600)
            summary = run.summary(workdir=work / "cluster")
            elapsed = time.perf_counter() - start
        assert summary["all_succeeded"], json.dumps(summary["counts"])

    per_node = args.jobs / args.nodes
    ideal = per_node * args.sleep
    print(f"{args.jobs} jobs of {args.sleep:g} s over {args.nodes} nodes, one at a time per "
          f"node (ideal makespan {ideal:.1f} s)")
    print(f"{'what':<40} {'makespan s':>10} {'jobs/s':>8} {'overhead/job ms':>16}")
    for name, seconds in (("direct subprocess, no broker (baseline)", baseline),
                          ("coordinator: Redis + Celery + .done", elapsed)):
        overhead = (seconds - ideal) / per_node * 1000
        print(f"{name:<40} {seconds:>10.2f} {args.jobs / seconds:>8.1f} {overhead:>16.0f}")
    print(f"coordinator / baseline: {elapsed / baseline:.2f}x; "
          f"{summary['succeeded']}/{summary['jobs_total']} succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
