"""What tests share besides fixtures: paths, running a console script, writing jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODES = ["rig-a", "rig-b", "rig-c", "rig-d"]
# Bound on any command a test runs (seconds).
COMMAND_TIMEOUT_S = 240


def run_cli(*args: str, tool: str = "coordinator", cwd: Path | None = None,
            env: dict[str, str] | None = None,
            timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run an installed console script as a user would; output captured as text."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(BIN / tool), *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def default_sigint() -> None:
    """``preexec_fn`` for a child a test will Ctrl-C: a suite started in the background
    (``nohup ... &``) ignores SIGINT, and a child would inherit that and never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps(jobs), encoding="utf-8")
    return path


def echo_job(job_id: str, node: str, out: str = "anywhere", *extra: Any,
             gpu_id: int = 0) -> dict[str, Any]:
    """A job of examples/write_output.py writing ``<out>/<job_id>.json``."""
    return {"job_id": job_id, "script": "examples/write_output.py",
            "args": ["--output-file", f"{out}/{job_id}.json", *extra],
            "node": node, "gpu_id": gpu_id}


def queue_lengths(client: redis.Redis, nodes: list[str] = NODES) -> dict[str, int]:
    return {node: int(client.llen(f"node.{node}")) for node in nodes}
