"""Batched publishing, the per-GPU mode and the run report (untimed: speed is in benchmarks/)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from pathlib import Path

import pytest
import redis

from coordinator import JobState, submit
from coordinator.errors import BrokerUnreachableError
from coordinator.redis_server import RedisServer
from coordinator.report import find_browser, render_svg
from tests.helpers import BIN, REPO, echo_job, run_cli, write_jobs
from tests.waiting import wait_for


def decoded(entry: bytes) -> tuple[dict, list]:
    """A queued kombu message: (headers, Celery protocol-2 body)."""
    message = json.loads(entry)
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return message["headers"], json.loads(body)


def test_batched_publishing_puts_every_job_once_in_its_nodes_queue() -> None:
    nodes = ["rig-p", "rig-q", "rig-r"]
    with RedisServer() as server:
        jobs = [echo_job(f"b{i:05d}", nodes[i % 3], "batch") for i in range(4500)]
        run = submit(jobs, output_dir="batch", broker_url=server.url)
        broker = redis.Redis.from_url(server.url)
        seen: Counter[str] = Counter()
        for node in nodes:
            entries = broker.lrange(f"node.{node}", 0, -1)
            assert len(entries) == 1500
            for entry in entries:
                headers, (args, kwargs, embed) = decoded(entry)
                # An ordinary Celery protocol-2 message, for this node's job.
                assert headers["task"] == "scripts_coordinator.run_job"
                assert headers["id"] == f"{run.id}.{args[0]['job_id']}.0"
                assert args[0]["node"] == node and kwargs == {}
                assert set(embed) >= {"callbacks", "errbacks", "chain", "chord"}
                seen[args[0]["job_id"]] += 1
        assert seen == Counter({job["job_id"]: 1 for job in jobs})
        status = run.status()
        assert status.total == 4500 and status.counts[JobState.QUEUED] == 4500


def test_a_plain_celery_worker_runs_a_batch_published_job(tmp_path: Path) -> None:
    with RedisServer() as server:
        run = submit([echo_job("plain", "rig-plain", "o")], output_dir="o",
                     broker_url=server.url)
        env = {**os.environ, "SC_BROKER_URL": server.url, "SC_SCRIPTS_DIR": str(REPO),
               "SC_WORKDIR": str(tmp_path)}
        worker = subprocess.Popen(
            [str(BIN / "celery"), "-A", "worker_tasks", "worker", "--queues", "node.rig-plain",
             "--concurrency", "1", "--prefetch-multiplier", "1", "--task-events",
             "--hostname", "rig-plain@%h", "--without-gossip", "--without-mingle"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            assert run.wait(timeout=90).jobs[0].state is JobState.SUCCEEDED
            assert (tmp_path / "o" / "plain.json.done").exists()
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)


def test_a_broker_failing_half_way_leaves_the_run_cancelled_and_its_part_dropped(
        tmp_path: Path) -> None:
    with RedisServer() as tracking, RedisServer() as broker_server:
        broker = redis.Redis.from_url(broker_server.url)
        # Room for a few hundred messages only: the broker refuses writes half-way.
        used = broker.info("memory")["used_memory"]
        broker.config_set("maxmemory", used + 400_000)
        broker.config_set("maxmemory-policy", "noeviction")
        jobs = [echo_job(f"h{i:04d}", "rig-h", "half") for i in range(3000)]
        with pytest.raises(BrokerUnreachableError, match="failed while publishing"):
            submit(jobs, output_dir="half", broker_url=broker_server.url,
                   tracking_url=tracking.url)
        published = broker.llen("node.rig-h")
        assert 0 < published < 3000  # half-way indeed
        client = redis.Redis.from_url(tracking.url)
        run_id = client.zrange("sc:runs", 0, 0)[0].decode()
        assert json.loads(client.hget(f"sc:run:{run_id}", "state")) == "cancelled"
        broker.config_set("maxmemory", 0)
        env = {**os.environ, "SC_BROKER_URL": broker_server.url,
               "SC_TRACKING_URL": tracking.url, "SC_SCRIPTS_DIR": str(REPO),
               "SC_WORKDIR": str(tmp_path)}
        log = tmp_path / "worker.log"
        with log.open("wb") as fh:
            worker = subprocess.Popen(
                [str(BIN / "celery"), "-A", "worker_tasks", "worker", "--queues", "node.rig-h",
                 "--concurrency", "1", "--prefetch-multiplier", "1", "--hostname", "rig-h@%h",
                 "--without-gossip", "--without-mingle"],
                cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True)
        dropped = "its run was cancelled; not run"
        try:
            # The last message popped is not yet dropped: wait for its line, not the queue.
            wait_for(lambda: broker.llen("node.rig-h") == 0
                     and log.read_text().count(dropped) >= published, 120,
                     "the worker to drop every message of the published part")
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
        assert not (tmp_path / "half").exists()  # nothing of the cancelled run ran
        assert log.read_text().count(dropped) == published


def test_per_gpu_mode_runs_a_job_per_gpu_at_once_and_one_per_gpu_at_a_time(
        tmp_path: Path) -> None:
    record = tmp_path / "times.jsonl"
    jobs = [echo_job(f"g{i}", "rig-g", "o", "--sleep", "0.6", "--record", str(record),
                     gpu_id=i % 2) for i in range(6)]
    jobs_file = write_jobs(tmp_path / "jobs.json", jobs)
    result = run_cli("local", "--jobs-file", str(jobs_file), "--scripts-dir", str(REPO),
                     "--per-gpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 workers (rig-g.gpu0, rig-g.gpu1)" in result.stderr
    spans: dict[str, list[tuple[float, float]]] = {"0": [], "1": []}
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        spans[str(int(entry["job"][1:]) % 2)].append((entry["start"], entry["end"]))
    for gpu_spans in spans.values():  # one at a time per GPU
        gpu_spans.sort()
        assert all(later[0] >= earlier[1] for earlier, later in zip(gpu_spans, gpu_spans[1:],
                                                                    strict=False))
    overlaps = sum(1 for a in spans["0"] for b in spans["1"] if a[0] < b[1] and b[0] < a[1])
    assert overlaps > 0  # the two GPUs of the node worked at once


def png_colours(path: Path) -> set[tuple[int, int, int]]:
    """Every RGB colour of an 8-bit, non-interlaced PNG (a small decoder: no Pillow here)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, header = 8, b"", b""
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks += body
        position += 12 + length
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour_type = header[8], header[9]
    assert depth == 8 and colour_type in (2, 6)
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(chunks)
    stride = width * channels
    previous = bytearray(stride)
    colours: set[tuple[int, int, int]] = set()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - corner
                best = min((abs(guess - left), 0, left), (abs(guess - up), 1, up),
                           (abs(guess - corner), 2, corner))[2]
                line[i] = (line[i] + best) & 0xFF
        previous = line
        colours.update(tuple(line[i:i + 3]) for i in range(0, stride, channels * 5))
    return colours


def summary_with(jobs: list[dict]) -> dict:
    counts = Counter(job["state"] for job in jobs)
    return {"run_id": "r", "jobs_total": len(jobs), "counts": dict(counts),
            "nodes": {job["node"]: {} for job in jobs}, "jobs": jobs}


def test_the_report_draws_every_attempt_coloured_by_outcome(redis_server: RedisServer,
                                                            cluster: object,
                                                            tmp_path: Path) -> None:
    jobs = [echo_job("ok", "rig-a", "rep"),
            {**echo_job("flaky", "rig-b", "rep", "--fail-unless-exists",
                        str(tmp_path / "never")), "retries": 1, "retry_delay": 0},
            echo_job("skip", "rig-c", "rep")]
    workdir = cluster.workdir  # type: ignore[attr-defined]
    (workdir / "rep").mkdir(exist_ok=True)
    (workdir / "rep" / "skip.json").write_text("{}")
    (workdir / "rep" / "skip.json.done").write_text("{}")
    run = submit(jobs, output_dir="rep", broker_url=redis_server.url)
    run.wait(timeout=90)
    out = tmp_path / "report.html"
    png = tmp_path / "report.png"
    args = ["report", run.id, "--out", str(out), "--broker", redis_server.url]
    if find_browser():
        args += ["--png", str(png)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    page = out.read_text()
    svg = ET.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])
    bars = [element for element in svg.iter("{http://www.w3.org/2000/svg}rect")
            if "bar" in (element.get("class") or "")]
    classes = Counter(bar.get("class") for bar in bars)
    assert classes == Counter({"bar succeeded": 1, "bar retried": 1, "bar failed": 1,
                               "bar skipped": 1})
    labels = [text.text for text in svg.iter("{http://www.w3.org/2000/svg}text")
              if text.get("class") == "row-label"]
    assert [label.split()[0] for label in labels] == ["rig-a", "rig-b", "rig-c"]
    assert "slowest jobs" in page and "makespan" in page
    if find_browser():  # a real rendering, not a blank page: the bars' colours are on it
        colours = png_colours(png)
        assert (0x2e, 0x7d, 0x32) in colours and (0xc6, 0x28, 0x28) in colours


def test_the_report_aggregates_when_bars_would_be_thinner_than_a_pixel() -> None:
    jobs = []
    for i in range(10_000):
        start = 1000.0 + (i // 4) * 0.5
        failed = i % 97 == 0
        jobs.append({"job_id": f"j{i}", "node": f"rig-{i % 4}", "state":
                     "failed" if failed else "succeeded", "finished_at": start + 0.4,
                     "attempt_history": [{"started_at": start, "finished_at": start + 0.4,
                                          "error": "boom" if failed else None}]})
    svg = ET.fromstring(render_svg(summary_with(jobs)))
    rects = [element for element in svg.iter("{http://www.w3.org/2000/svg}rect")
             if "column" in (element.get("class") or "")]
    assert 0 < len(rects) <= 4 * 1060  # at most a rect per pixel column per node
    assert {rect.get("class") for rect in rects} <= {"column succeeded", "column failed"}
    assert len(ET.tostring(svg)) < 2_000_000  # readable, and small enough to open
