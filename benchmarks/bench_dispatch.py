"""Dispatch, four ways, on the same scripts: this project as it starts by default (warm) and
cold, GNU parallel, and the old design.

    python benchmarks/bench_dispatch.py [--sizes 36,1000] [--delays 0,0.2] [--nodes 4]
        [--scripts no-op,numpy]

Every way runs each script N times, one job at a time per node, the nodes in parallel;
the scripts are ``examples/write_output.py --sleep D`` (no-op: it writes a JSON output
file) and ``benchmarks/numpy_job.py --sleep D`` (the same after ``import numpy``):

* coordinator (default, warm): a LocalCluster (private Redis, one Celery worker per node)
  whose workers start as ``coordinator local`` starts them by default: each job forked from
  a zygote that imported NumPy and the Step 3 engines once; then submit, wait and collect,
  with the ``.done`` rule, tracking, lease and runner;
* coordinator --cold: the same with each job's interpreter started fresh;
* GNU parallel with one slot per node (``parallel -j NODES``), the baseline;
* the old design (no-op script only): one thread per node running its jobs one after
  another, each over a new SSH connection (``ssh host python script ...``) to a real sshd
  this benchmark starts on 127.0.0.2 with a key of its own.

It prints makespan, jobs per second and the overhead per job (makespan per
node slot minus the work), then the marginal cost of one more job (the slope
between the smallest and the largest N) as a ratio to GNU parallel's, and
where the coordinator's per-job time goes, read from the run's own records.
GNU parallel (``parallel``) and openssh-server are installed with apt-get
when missing and allowed; a way that cannot run is reported as skipped.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator import submit  # noqa: E402
from coordinator.local import LocalCluster, warm_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The scripts, as jobs name them (under the workers' scripts directory, REPO) and their files.
SCRIPTS = {"no-op": "examples/write_output.py", "numpy": "benchmarks/numpy_job.py"}
FILES = {"examples/write_output.py": REPO / "worker_tasks" / "builtin_scripts" / "examples" /
         "write_output.py", "benchmarks/numpy_job.py": REPO / "benchmarks" / "numpy_job.py"}
SCRIPT = FILES[SCRIPTS["no-op"]]
WAYS = ("coordinator (default)", "coordinator --cold", "GNU parallel", "old: SSH per job")


def jobs_for(count: int, nodes: list[str], sleep: float, tag: str,
             script: str = SCRIPTS["no-op"]) -> list[dict]:
    return [{"job_id": f"{tag}_{i:04d}", "script": script,
             "args": ["--output-file", f"out/{tag}_{i:04d}.json", "--sleep", str(sleep)],
             "node": nodes[i % len(nodes)]} for i in range(count)]


def ensure_debian_package(binary: str, package: str) -> bool:
    if shutil.which(binary) or Path(binary).exists():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    print(f"installing {package} (apt-get) ...", file=sys.stderr)
    done = subprocess.run(["apt-get", "install", "-y", "-q", package], capture_output=True,
                          env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=False)
    return done.returncode == 0 and (shutil.which(binary) is not None or Path(binary).exists())


def coordinator_way(cluster: LocalCluster, jobs: list[dict], work: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    run = submit(jobs, output_dir="out", broker_url=cluster.broker_url, workdir=work)
    run.wait(timeout=3600, workdir=work)
    summary = run.summary(workdir=work)
    elapsed = time.perf_counter() - start
    assert summary["all_succeeded"], json.dumps(summary["counts"])
    return elapsed, summary


def parallel_way(jobs: list[dict], slots: int, work: Path) -> float:
    lines = "".join(" ".join(job["args"]) + "\n" for job in jobs)
    script = FILES[jobs[0]["script"]]
    start = time.perf_counter()
    subprocess.run(["parallel", "--will-cite", "-j", str(slots), "--colsep", " ",
                    sys.executable, str(script), "{1}", "{2}", "{3}", "{4}"],
                   input=lines, text=True, cwd=work, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


class SshHost:
    """A throwaway sshd on 127.0.0.2 that the old design's per-job connections go to."""

    def __init__(self, root: Path) -> None:
        from tests.sshd import SshHost as TestHost
        from tests.sshd import keygen

        root.mkdir(parents=True, exist_ok=True)
        self.key = keygen(root / "id_ed25519")
        self.host = TestHost("127.0.0.2", root / "host", self.key.with_suffix(".pub")).start()

    def ssh(self, *argv: str) -> list[str]:
        return ["ssh", "-q", "-i", str(self.key), "-p", str(self.host.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", f"{getpass.getuser()}@{self.host.address}", *argv]

    def close(self) -> None:
        self.host.stop()


def old_way(jobs: list[dict], nodes: list[str], work: Path, host: SshHost) -> float:
    """One SSH connection per job; a node's jobs one after another; nodes in parallel."""
    def run_node(node: str) -> None:
        for job in jobs:
            if job["node"] == node:
                command = " ".join([f"cd {work} &&", sys.executable, str(SCRIPT), *job["args"]])
                subprocess.run(host.ssh(command), check=True, stdout=subprocess.DEVNULL)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(run_node, nodes))
    return time.perf_counter() - start


def where_the_time_went(summary: dict) -> str:
    """Per job, from the run's records: the script's attempt, and the gap between jobs."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for job in summary["jobs"]:
        for attempt in job["attempt_history"]:
            spans.setdefault(job["node"], []).append((attempt["started_at"],
                                                      attempt["finished_at"]))
    inside, gaps = [], []
    for node_spans in spans.values():
        node_spans.sort()
        inside += [end - start for start, end in node_spans]
        gaps += [later[0] - earlier[1] for earlier, later in zip(node_spans, node_spans[1:],
                                                                 strict=False)]
    return (f"inside an attempt {statistics.median(inside) * 1000:.0f} ms (the script's own "
            f"Python start and work, the runner, the marker), between jobs on a node "
            f"{statistics.median(gaps) * 1000:.0f} ms (recording the result, Celery's "
            f"acknowledgement and the next message): medians")


def script_alone(work: Path, repeat: int = 20) -> float:
    """The script run directly, one after another: its own start-up and work."""
    start = time.perf_counter()
    for index in range(repeat):
        subprocess.run([sys.executable, str(SCRIPT), "--output-file", f"alone/{index}.json"],
                       cwd=work, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) / repeat


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: the clusters, sshd and temporary files go too


def main() -> int:
    signal.signal(signal.SIGTERM, interrupted)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="36,1000", help="job counts (default: 36,1000)")
    parser.add_argument("--delays", default="0,0.2", help="seconds of work per job")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--scripts", default="no-op,numpy",
                        help=f"which scripts ({', '.join(SCRIPTS)}; default: both)")
    parser.add_argument("--no-ssh", action="store_true", help="leave out the old design")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    delays = [float(delay) for delay in args.delays.split(",")]
    scripts = [name for name in args.scripts.split(",") if name]
    unknown = [name for name in scripts if name not in SCRIPTS]
    if unknown:
        parser.error(f"--scripts: unknown {unknown[0]!r} (known: {', '.join(SCRIPTS)})")
    nodes = [f"rig-{chr(ord('a') + i)}" for i in range(args.nodes)]
    have_parallel = ensure_debian_package("parallel", "parallel")
    have_ssh = not args.no_ssh and ensure_debian_package("/usr/sbin/sshd", "openssh-server")

    results: dict[tuple[str, str, int, float], float] = {}
    profiles: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp:
        work = Path(tmp)
        (work / "alone").mkdir()
        alone = script_alone(work)
        host = SshHost(work / "ssh") if have_ssh else None
        try:
            for way, env in ((WAYS[0], warm_env(None)), (WAYS[1], {})):
                with LocalCluster(nodes, scripts_dir=REPO, workdir=work / "cluster",
                                  log_dir=work / "logs" / way.split()[-1].strip("()-"),
                                  extra_env=env, die_with_parent=True) as cluster:
                    for name in scripts:
                        for delay in delays:
                            for size in sizes:
                                tag = f"{'w' if env else 'c'}{name}d{int(delay * 1000)}n{size}"
                                jobs = jobs_for(size, nodes, delay, tag, SCRIPTS[name])
                                seconds, summary = coordinator_way(cluster, jobs,
                                                                   work / "cluster")
                                results[way, name, size, delay] = seconds
                                if size == max(sizes) and delay == 0 and name == scripts[0]:
                                    profiles[way] = where_the_time_went(summary)
            for name in scripts:
                for delay in delays:
                    for size in sizes:
                        jobs = jobs_for(size, nodes, delay, f"{name}d{delay}n{size}",
                                        SCRIPTS[name])
                        if have_parallel:
                            (work / "parallel" / "out").mkdir(parents=True, exist_ok=True)
                            results["GNU parallel", name, size, delay] = parallel_way(
                                jobs, len(nodes), work / "parallel")
                        if host is not None and name == "no-op":
                            (work / "old" / "out").mkdir(parents=True, exist_ok=True)
                            results["old: SSH per job", name, size, delay] = old_way(
                                jobs, nodes, work / "old", host)
        finally:
            if host is not None:
                host.close()

    print(f"{len(nodes)} nodes, one job at a time per node; the no-op script alone takes "
          f"{alone * 1000:.0f} ms (Python start-up and its work)")
    print(f"{'way':<21} {'script':<7} {'N':>5} {'D s':>5} {'makespan s':>11} {'jobs/s':>8} "
          f"{'overhead/job ms':>16}")
    for name in scripts:
        for delay in delays:
            for size in sizes:
                for way in WAYS:
                    if (way, name, size, delay) not in results:
                        continue
                    seconds = results[way, name, size, delay]
                    overhead = (seconds * len(nodes) / size - delay) * 1000
                    print(f"{way:<21} {name:<7} {size:>5} {delay:>5.1f} {seconds:>11.2f} "
                          f"{size / seconds:>8.1f} {overhead:>16.0f}")
    small, large = min(sizes), max(sizes)
    print("marginal cost of one more job (per node slot, between N = "
          f"{small} and N = {large}):")
    for name in scripts:
        for delay in delays:
            slopes = {way: (results[way, name, large, delay] - results[way, name, small, delay])
                      * len(nodes) / (large - small) for way in WAYS
                      if (way, name, large, delay) in results
                      and (way, name, small, delay) in results}
            base = slopes.get("GNU parallel")
            for way, slope in slopes.items():
                ratio = f"  {slope / base:.2f}x GNU parallel" if base else ""
                print(f"  {name:<7} D = {delay:g} s  {way:<21} {slope * 1000:>7.1f} ms{ratio}")
    for way, profile in profiles.items():
        print(f"{way}, {scripts[0]}, N = {large}, D = 0: {profile}")
    for way in WAYS[2:]:
        if not any(key[0] == way for key in results):
            print(f"{way}: skipped (not installed here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
