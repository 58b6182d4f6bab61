"""Head node: validate jobs, publish them to per-node queues, track, collect.

The Python API for other pipeline steps::

    from coordinator import submit
    run = submit("scoring_jobs.json", output_dir="full_scoring_results")
    run.wait(timeout=3600, on_progress=print)
    summary = run.summary()
"""

from coordinator.errors import CoordinatorError, ExitCode
from coordinator.run import JobRecord, Run, RunStatus
from coordinator.submit import get_run, submit
from worker_tasks.tracking import JobState, RunState

__all__ = [
    "CoordinatorError", "ExitCode", "JobRecord", "JobState", "Run", "RunState", "RunStatus",
    "get_run", "submit",
]
