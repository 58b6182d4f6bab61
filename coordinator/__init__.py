"""Head node: validate jobs, publish them to per-node queues, track, collect.

The Python API for other pipeline steps::

    from coordinator import submit
    run = submit("scoring_jobs.json", output_dir="full_scoring_results")
    run.wait(timeout=3600, on_progress=print)
    summary = run.summary()
"""

from coordinator.errors import (
    BrokerUnreachableError,
    CoordinatorError,
    ExitCode,
    InvalidJobsError,
    NodeFailedError,
    RunNotFoundError,
    WaitTimeoutError,
)
from coordinator.options import SubmitOptions
from coordinator.records import JobRecord, RunStatus
from coordinator.run import Run, get_run, prepare, publish, recover, submit
from worker_tasks.tracking import JobState, RunState

__all__ = [
    "BrokerUnreachableError", "CoordinatorError", "ExitCode", "InvalidJobsError", "JobRecord",
    "JobState", "NodeFailedError", "Run", "RunNotFoundError", "RunState", "RunStatus",
    "SubmitOptions", "WaitTimeoutError", "get_run", "prepare", "publish", "recover", "submit",
]
