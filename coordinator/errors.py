"""Errors the head node reports, each with its own exit status.

Every error is printed as one line (``str(err)``) by the CLI; the exit status
tells scripts what kind of failure it was without parsing the text.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of ``coordinator`` and ``scripts-coordinator``."""

    OK = 0
    JOBS_FAILED = 1  # the run finished and at least one job failed
    INVALID_INPUT = 2  # jobs file, flags or arguments refused; nothing published
    BROKER_UNREACHABLE = 3  # Redis did not answer; nothing (more) published
    RUN_NOT_FOUND = 4  # no such run id in Redis (expired, or a typo)
    WAIT_TIMEOUT = 5  # --timeout passed before the run finished
    CLUSTER_FAILED = 6  # `local` could not start, or a cluster node failed (SSH)
    UNCONFIRMED = 7  # no job failed, but a .done is not where the collector looked
    NO_WORKER = 8  # waiting, no worker served the run's waiting jobs for the bound given
    INTERRUPTED = 130  # Ctrl-C


class CoordinatorError(Exception):
    """Base class: a failure with a one-line message and an exit status."""

    exit_code: ExitCode = ExitCode.JOBS_FAILED


class InvalidJobsError(CoordinatorError):
    """The jobs file (or another input) is not valid; nothing was published."""

    exit_code = ExitCode.INVALID_INPUT


class BrokerUnreachableError(CoordinatorError):
    """Redis could not be reached within the connect timeout."""

    exit_code = ExitCode.BROKER_UNREACHABLE


class RunNotFoundError(CoordinatorError):
    """The run id is unknown to the tracking Redis."""

    exit_code = ExitCode.RUN_NOT_FOUND


class WaitTimeoutError(CoordinatorError):
    """The run did not finish within the time asked for."""

    exit_code = ExitCode.WAIT_TIMEOUT


class NoWorkerError(CoordinatorError):
    """No worker served any of the run's waiting jobs for as long as the caller would wait."""

    exit_code = ExitCode.NO_WORKER


class ClusterStartError(CoordinatorError):
    """The local cluster could not start Redis or one of its workers."""

    exit_code = ExitCode.CLUSTER_FAILED


class NodeFailedError(CoordinatorError):
    """A cluster node could not do its part (unreachable, refused, worker died)."""

    exit_code = ExitCode.CLUSTER_FAILED
