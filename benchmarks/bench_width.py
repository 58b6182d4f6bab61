"""At cluster width: N real workers on this machine, started the way `cluster up` starts them.

    python benchmarks/bench_width.py [--widths 25,50,100] [--jobs-per-node 10] [--batch 10]

For each N: a private Redis; N workers ``rig-000``.. started with ``coordinator worker
--detach``, ``--batch`` at a time (as ``cluster up`` does over SSH, one command per node);
then, idle and during a run of ``--jobs-per-node`` jobs per node, the wall time of

* ``coordinator status`` (a finished run idle; the running one during the run), and of
  what it computes in-process (``Run.settle`` + ``Run.status`` + ``Run.workers``);
* ``coordinator metrics --textfile`` and ``metrics.collect`` in-process;
* the baseline the views used before: an ``inspect().active_queues()`` broadcast
  (what ``status`` and each ``worker --detach`` asked), so the ratio says what changed;

(idle: the median of ``--repeats`` timings; during the run: one, as the run goes on)
and the memory of one worker (PSS of its session's processes, the median). Targets (issue
21): per-worker start time flat in N (within 1.5x from the smallest to the largest N),
``status`` and ``metrics`` under 0.5 s at 100 idle nodes. Every worker is stopped at the
end, and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from coordinator import submit  # noqa: E402
from coordinator.broker import publisher  # noqa: E402
from coordinator.metrics import collect  # noqa: E402
from coordinator.redis_server import RedisServer  # noqa: E402
from coordinator.run import get_run  # noqa: E402
from worker_tasks.daemon import session_members  # noqa: E402

BIN = Path(sys.executable).parent
# The wall-clock bound on one command of the benchmark (seconds).
COMMAND_TIMEOUT_S = 300


def coordinator(*args: str, env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Run a coordinator command; (seconds, stdout). Fails loudly if it fails."""
    start = time.perf_counter()
    result = subprocess.run([str(BIN / "coordinator"), *args], env=env, cwd=cwd, text=True,
                            capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode not in (0, 1):  # status is 1 with failed jobs: still timed
        raise RuntimeError(f"coordinator {' '.join(args)}: exit {result.returncode}: "
                           f"{result.stderr.strip()[-500:]}")
    return elapsed, result.stdout


def pss_kib(pid: int) -> int:
    """The proportional set size of a worker's session (the worker, its pool, its job)."""
    total = 0
    for member in session_members(pid):
        try:
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def start_workers(nodes: list[str], batch: int, env: dict[str, str], work: Path) -> list[float]:
    """Start every node's worker, ``batch`` at a time; the seconds per worker of each batch."""
    per_worker = []
    with ThreadPoolExecutor(max_workers=batch) as pool:
        for first in range(0, len(nodes), batch):
            part = nodes[first:first + batch]
            start = time.perf_counter()
            list(pool.map(lambda node: coordinator("worker", "--node", node, "--workdir",
                                                   str(work), "--detach", env=env, cwd=work),
                          part))
            per_worker.append((time.perf_counter() - start) / len(part))
    return per_worker


def stop_workers(nodes: list[str], env: dict[str, str], work: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda node: subprocess.run(
            [str(BIN / "coordinator"), "worker", "--node", node, "--workdir", str(work),
             "--stop", "--now"], env=env, cwd=work, capture_output=True,
            timeout=COMMAND_TIMEOUT_S, check=False), nodes))


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    """The median of ``repeats`` timings: one sample is at the mercy of N workers' heartbeats."""
    return statistics.median(measure() for _ in range(repeats))


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def views(run_id: str, url: str, env: dict[str, str], work: Path,
          repeats: int) -> dict[str, float]:
    """Seconds of each operator view (the median of ``repeats``), on the CLI and in-process,
    and the broadcast baseline."""
    client = redis.Redis.from_url(url)
    run = get_run(run_id, url)

    def in_process_status() -> None:
        run.settle()
        run.workers(run.status(light=True).by_node())

    app = publisher(url)
    return {
        "status (CLI)": median_of(repeats, lambda: coordinator("status", run_id, env=env,
                                                               cwd=work)[0]),
        "status (in-process)": median_of(repeats, lambda: timed(in_process_status)),
        "metrics (CLI)": median_of(repeats, lambda: coordinator(
            "metrics", "--textfile", str(work / "m.prom"), env=env, cwd=work)[0]),
        "metrics (in-process)": median_of(repeats, lambda: timed(lambda: collect(client,
                                                                                client))),
        "baseline: inspect broadcast": median_of(repeats, lambda: timed(
            lambda: app.control.inspect(timeout=1.0).active_queues())),
    }


def measure(width: int, jobs_per_node: int, batch: int, repeats: int) -> dict[str, object]:
    nodes = [f"rig-{index:03d}" for index in range(width)]
    with tempfile.TemporaryDirectory(prefix="sc-width-") as tmp, RedisServer() as server:
        work = Path(tmp)
        env = {**os.environ, "SC_BROKER_URL": server.url}
        try:
            starts = start_workers(nodes, batch, env, work)
            pids = [int((work / ".scripts-coordinator" / f"worker-{node}.pid").read_text())
                    for node in nodes]
            memory = statistics.median(pss_kib(pid) for pid in pids) / 1024
            # A finished run for the idle views: one no-op job per node.
            warm = submit([{"job_id": f"idle_{node}", "script": "examples/write_output.py",
                            "node": node, "args": ["--output-file", f"idle/{node}.json"]}
                           for node in nodes], output_dir="idle", workdir=work,
                          broker_url=server.url)
            warm.wait(timeout=COMMAND_TIMEOUT_S)
            idle = views(warm.id, server.url, env, work, repeats)
            jobs = [{"job_id": f"busy_{node}_{index}", "script": "examples/write_output.py",
                     "node": node, "args": ["--output-file", f"busy/{node}_{index}.json",
                                            "--sleep", "0.5"]}
                    for index in range(jobs_per_node) for node in nodes]
            busy_run = submit(jobs, output_dir="busy", workdir=work, broker_url=server.url)
            busy = views(busy_run.id, server.url, env, work, repeats=1)
            final = busy_run.wait(timeout=COMMAND_TIMEOUT_S * 4)
            assert final.all_succeeded, final.line()
        finally:
            stop_workers(nodes, env, work)
    return {"width": width, "starts": starts, "memory_mib": memory, "idle": idle, "busy": busy}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="25,50,100")
    parser.add_argument("--jobs-per-node", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10, help="workers started at once")
    parser.add_argument("--repeats", type=int, default=5,
                        help="idle views: the median of this many timings")
    args = parser.parse_args()
    results = [measure(int(width), args.jobs_per_node, args.batch, args.repeats)
               for width in args.widths.split(",")]
    print(f"{'N':>4} {'start s/worker':>15} {'last batch':>11} {'PSS MiB/worker':>15}")
    for result in results:
        starts = result["starts"]
        print(f"{result['width']:>4} {statistics.mean(starts):>15.2f} {starts[-1]:>11.2f} "
              f"{result['memory_mib']:>15.1f}")
    print()
    for phase in ("idle", "busy"):
        print(f"{phase}: seconds per view (baseline: the broadcast the views used before)")
        names = list(results[0][phase])
        print(f"  {'view':<30}" + "".join(f"{'N=' + str(r['width']):>9}" for r in results))
        for name in names:
            print(f"  {name:<30}" + "".join(f"{r[phase][name]:>9.3f}" for r in results))
    first, last = results[0], results[-1]
    ratio = statistics.mean(last["starts"]) / statistics.mean(first["starts"])
    print(f"\nstart time per worker, N={last['width']} / N={first['width']}: {ratio:.2f}x "
          f"(target: within 1.5x)")
    for name in ("status (CLI)", "metrics (CLI)", "status (in-process)",
                 "metrics (in-process)"):
        seconds = last["idle"][name]
        baseline = last["idle"]["baseline: inspect broadcast"]
        print(f"{name} at N={last['width']} idle: {seconds:.3f} s (target < 0.5 s); the "
              f"broadcast alone: {baseline:.3f} s ({baseline / seconds:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
