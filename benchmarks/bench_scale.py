"""Scale of the orchestration itself: submitting, following and collecting 100,000 jobs.

    python benchmarks/bench_scale.py [--sizes 10000,100000]

For each size it writes a Step 3 jobs file (the original format, 8 nodes, no
workers: the jobs stay queued) and, against a private Redis, runs the real
command lines and measures wall time and peak memory of each:

* ``coordinator submit`` (validation, tracking records, batched publishing), unsigned and,
  for the smaller size, signed with a throwaway head key;
* ``coordinator status`` (with its checks), ``status --no-check``, ``collect``;
* following: the first full read of a ``wait``, then one poll (what ``wait``
  does every half second: the counters and the change stream, not the records);
* Redis memory per queued job (its message in the queue and its record);
* the CLI's own start: ``coordinator --help``, and ``coordinator runs`` and
  ``coordinator status RUN`` on an empty Redis and on a small run (median of 5 each).

The baseline, in the same run on the smaller size: what the previous main did,
one ``send_task`` and one tracking write per job, each its own round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from coordinator.broker import publisher  # noqa: E402
from coordinator.follow import RunFollower  # noqa: E402
from coordinator.options import SubmitOptions  # noqa: E402
from coordinator.redis_server import RedisServer  # noqa: E402
from coordinator.submission import prepare, task_id_for  # noqa: E402
from worker_tasks.signing import make_keypair  # noqa: E402
from worker_tasks.spec import RUN_JOB_TASK  # noqa: E402
from worker_tasks.tracking import encode, job_key  # noqa: E402

BIN = Path(sys.executable).parent
# The targets (seconds, MB), printed beside each figure.
TARGETS = {("submit", 10_000): 2.0, ("submit", 100_000): 20.0, "status": 10.0, "collect": 10.0,
           "poll": 10.0, "memory": 300, "start": 0.2}
# Each start-up figure is the median of this many runs.
START_REPEATS = 5


def write_jobs(path: Path, count: int) -> Path:
    jobs = [{"job_id": f"chunk_{i:06d}", "script": "full_scoring_worker.py",
             "args": ["--seeds-file", f"scoring_chunks/chunk_{i:06d}.json",
                      "--train-history", "train_history.json",
                      "--output-file", f"full_scoring_results/chunk_{i:06d}.json",
                      "--prng-type", "java_lcg", "--mod", "1000"],
             "node": f"rig-{i % 8}", "gpu_id": i % 2} for i in range(count)]
    path.write_text(json.dumps(jobs))
    return path


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one command."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    out = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{' '.join(argv)} failed")
    return seconds, usage.ru_maxrss / 1024, out


def start_times(work: Path, env: dict[str, str]) -> None:
    """The CLI's start, before any run: --help, runs, and status of a 10-job run."""
    small = write_jobs(work / "jobs10.json", 10)
    _, _, out = timed([str(BIN / "coordinator"), "submit", "--jobs-file", str(small)], work, env)
    run_id = out.strip()
    for what, argv in (("coordinator --help", ["--help"]), ("coordinator runs", ["runs"]),
                       ("coordinator status (10 jobs)", ["status", run_id, "--no-check"])):
        seconds = sorted(timed([str(BIN / "coordinator"), *argv], work, env)[0]
                         for _ in range(START_REPEATS))[START_REPEATS // 2]
        row(f"start: {what}", f"{seconds:.3f} s", f"< {TARGETS['start']:g} s")


def unbatched_baseline(url: str, jobs_file: Path) -> float:
    """The previous main: a send_task and a tracking HSET per job, each a round trip."""
    plan = prepare(jobs_file, SubmitOptions(), run_id="baseline-run")
    app = publisher(url)
    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for spec in plan.specs:
            message = spec.to_message()
            client.hset(job_key(plan.run_id, spec.job_id),
                        mapping=encode({**message, "state": "queued", "spec": message}))
            app.send_task(RUN_JOB_TASK, args=[message], queue=spec.queue,
                          task_id=task_id_for(spec), producer=producer, retry=False)
    return time.perf_counter() - start


def follow_costs(url: str, run_id: str) -> tuple[float, float]:
    follower = RunFollower(redis.Redis.from_url(url), run_id)
    start = time.perf_counter()
    follower.poll()  # the first: everything
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(10):
        follower.poll()
    return first, (time.perf_counter() - start) / 10


def row(what: str, figure: str, target: str = "", ratio: str = "") -> None:
    print(f"{what:<44} {figure:>14} {target:>12} {ratio:>14}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="sc-scale-") as tmp, RedisServer() as server:
        work = Path(tmp)
        # Unsigned unless the row says otherwise (a head key of the user's is not used).
        env = {**os.environ, "SC_BROKER_URL": server.url, "SC_UNSIGNED": "1"}
        client = redis.Redis.from_url(server.url)
        row("what", "figure", "target", "vs baseline")
        start_times(work, env)
        client.flushall()
        baseline_file = write_jobs(work / f"jobs{min(sizes)}.json", min(sizes))
        baseline = unbatched_baseline(server.url, baseline_file)
        row(f"baseline: submit {min(sizes):,} unbatched (in-process)", f"{baseline:.2f} s")
        client.flushall()
        for size in sizes:
            jobs_file = write_jobs(work / f"jobs{size}.json", size)
            before = client.info("memory")["used_memory"]
            seconds, rss, out = timed([str(BIN / "coordinator"), "submit", "--jobs-file",
                                       str(jobs_file)], work, env)
            per_job = (client.info("memory")["used_memory"] - before) / size
            run_id = out.strip()
            target = TARGETS.get(("submit", size))
            ratio = f"{baseline / seconds * size / min(sizes):.1f}x faster" if baseline else ""
            unsigned = seconds
            row(f"submit {size:,} jobs (CLI)", f"{seconds:.2f} s",
                f"< {target:g} s" if target else "", ratio)
            row("  coordinator peak memory", f"{rss:.0f} MB", f"< {TARGETS['memory']} MB")
            row("  Redis memory per queued job", f"{per_job:,.0f} B")
            for name, extra in (("status", []), ("status --no-check", ["--no-check"]),
                                ("collect", ["collect"])):
                command = ["collect", run_id] if name == "collect" else ["status", run_id, *extra]
                seconds, rss, _ = timed([str(BIN / "coordinator"), *command], work, env)
                row(f"{name} of {size:,} jobs", f"{seconds:.2f} s", f"< {TARGETS['status']:g} s")
            first, poll = follow_costs(server.url, run_id)
            row(f"wait: first read of {size:,} jobs", f"{first:.2f} s", f"< {TARGETS['poll']:g} s")
            row("wait: each poll after it", f"{poll * 1000:.1f} ms")
            client.flushall()
            if size == min(sizes):
                key, cert = make_keypair(work / "keys", "head")
                signed_env = {**env, "SC_SIGNING_KEY": str(key), "SC_SIGNING_CERT": str(cert)}
                signed_env.pop("SC_UNSIGNED")
                signed, _, _ = timed([str(BIN / "coordinator"), "submit", "--jobs-file",
                                      str(jobs_file)], work, signed_env)
                row(f"submit {size:,} jobs signed (CLI)", f"{signed:.2f} s", "",
                    f"{signed / unsigned:.2f}x unsigned")
                client.flushall()
    return 0


if __name__ == "__main__":
    sys.exit(main())
