"""The message contract between the head node and a worker: one job, fully planned.

The head node resolves everything that depends on the run (rewritten paths,
the ``.done`` marker, the log file) so the worker only has to execute it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The stable task name: workers and publishers of any version agree on it.
RUN_JOB_TASK = "scripts_coordinator.run_job"


# Environment a job may not set: these would let a message load code of its choosing
# (LD_PRELOAD, PYTHONPATH, ...) or move it off its GPU. Checked on both sides.
PROTECTED_ENV_PREFIXES = ("LD_", "PYTHON", "SC_")
PROTECTED_ENV_NAMES = frozenset({"PATH", "CUDA_VISIBLE_DEVICES", "HOME"})


def is_protected_env(name: str) -> bool:
    return name in PROTECTED_ENV_NAMES or name.startswith(PROTECTED_ENV_PREFIXES)


def queue_for(node: str) -> str:
    """The Redis queue of a node: ``node.<node>``."""
    return f"node.{node}"


def done_path_for(output_file: str | None, output_dir: str, job_id: str) -> str:
    """The ``.done`` rule: ``<output-file>.done``, else ``<output-dir>/<job_id>.json.done``."""
    if output_file:
        return f"{output_file}.done"
    return f"{output_dir.rstrip('/')}/{job_id}.json.done"


@dataclass(frozen=True)
class JobSpec:
    """One job as the worker receives it (JSON-serialisable).

    Parameters:
        run_id: the run this job belongs to (tracking keys, cancel flag).
        job_id: unique within the run.
        script: relative to the worker's scripts directory.
        args: final argument list (paths already rewritten).
        node, gpu_id: where it runs; gpu_id becomes ``CUDA_VISIBLE_DEVICES``.
        output_file: the file the script must produce, or None.
        done_file: the marker the worker writes on success.
        log_file: stdout and stderr of the script.
        timeout: seconds before the script is killed, or None.
        env: extra environment variables for the script.
    """

    run_id: str
    job_id: str
    script: str
    args: list[str]
    node: str
    gpu_id: int
    output_file: str | None
    done_file: str
    log_file: str
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)

    def to_message(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> JobSpec:
        known = {name: message[name] for name in cls.__dataclass_fields__ if name in message}
        return cls(**known)
