"""Head node: validate jobs, publish them to per-node queues, track, collect.

The Python API for other pipeline steps::

    from coordinator import submit
    run = submit("scoring_jobs.json", output_dir="full_scoring_results")
    run.wait(timeout=3600, on_progress=print)
    summary = run.summary()
"""

from typing import Any

# Where each public name lives; imported on first use, so that `coordinator --help` and the
# light verbs do not pay for Celery, redis-py and pydantic. No submodule shares a name with
# these (importing one would rebind the package's attribute to the module).
_EXPORTS = {
    "coordinator.errors": ("BrokerUnreachableError", "CoordinatorError", "ExitCode",
                           "InvalidJobsError", "NodeFailedError", "RunNotFoundError",
                           "WaitTimeoutError"),
    "coordinator.options": ("SubmitOptions",),
    "coordinator.records": ("JobRecord", "RunStatus"),
    "coordinator.run": ("Run", "get_run", "prepare", "publish", "recover", "submit"),
    "worker_tasks.tracking": ("JobState", "RunState"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def project_version() -> str:
    """This installation's version of scripts-coordinator (``unknown`` outside one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scripts-coordinator")
    except PackageNotFoundError:
        return "unknown"


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
