"""How a jobs file becomes a run: the one type for every submission setting.

``submit``, ``recover``, ``local``, ``demo``, ``scripts-coordinator`` and the
Python API all build a ``SubmitOptions`` and hand it to ``prepare`` (validate
and plan) and ``publish`` (record and send). Defaults live here and nowhere
else; the CLI's flags read their defaults from this class.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.errors import InvalidJobsError
from worker_tasks.spec import DEFAULT_RETRY_DELAY_S

if TYPE_CHECKING:  # the inventory module (Fabric-free, but not needed to submit) loads lazily
    from coordinator.cluster.inventory import Inventory

DEFAULT_OUTPUT_DIR = "full_scoring_results"
DEFAULT_CHUNK_DIR = "scoring_chunks"
# How long a command that follows a run waits with no worker serving it, nothing running,
# before it gives up (seconds; the run goes on): a broker nobody serves is not waited on for
# ever (``--no-worker-timeout``).
NO_WORKER_TIMEOUT_S = float(os.environ.get("SC_NO_WORKER_TIMEOUT", "120"))


@dataclass(frozen=True)
class SubmitOptions:
    """Every setting of a submission.

    Parameters:
        output_dir: base output directory, relative to the workers' workdir; each job's
            ``--output-file`` becomes ``<output_dir>/<its basename>``.
        preserve_paths: pass args untouched (no rewriting; Step 5).
        chunk_dir: where inline seeds of legacy scoring jobs are written.
        workdir: where the output directory is as this process sees the workers' files
            (``.done`` markers, legacy chunks), recorded with the run.
        retries: automatic retries of a failed attempt, for jobs that set none.
        retry_delay: base of the backoff between attempts (seconds), likewise.
        per_gpu: one job at a time per GPU of a node (queues ``node.<node>.gpu<k>``).
        balance: every job without ``"pin": true`` floats (its node becomes ``any``): the
            first free node (or GPU slot) takes it.
        inventory: the cluster inventory: node names are resolved through it, and nodes
            without shared storage get their inputs pushed and outputs fetched.
        scripts_dir: where the workers' scripts are, as this machine sees them; when given,
            a job whose script is neither there nor among the built-in scripts is refused
            while planning (``--dry-run`` too), not on the worker. None: not checked here.
        after_runs: runs this one waits for: it is recorded and published held, and starts
            once each has succeeded (``after_any``: once each has ended, however).
        after_any: wait for the runs of ``after_runs`` to end, not to succeed.
        job_timeout: the ``timeout`` of jobs that set none: seconds, or ``"P%"`` of the
            median duration of the run's succeeded jobs of the same script (``--job-timeout``;
            not ``--timeout``, which bounds how long a command waits for the run).
        halt: ``now|soon,fail|success=N|P%`` (GNU parallel's ``--halt``): when the run stops
            itself (``worker_tasks.halt``); None: never.
        speculate: while the head follows the run, a straggling floating job may get a
            backup copy on an idle slot (``worker_tasks.copies``); False (``--no-speculate``)
            marks every job that does not say ``"speculate"`` never to be copied.
    """

    output_dir: str = DEFAULT_OUTPUT_DIR
    preserve_paths: bool = False
    chunk_dir: str = DEFAULT_CHUNK_DIR
    workdir: Path = Path(".")
    retries: int = 0
    retry_delay: float = DEFAULT_RETRY_DELAY_S
    per_gpu: bool = False
    balance: bool = False
    inventory: Inventory | None = None
    scripts_dir: Path | None = None
    after_runs: tuple[str, ...] = ()
    after_any: bool = False
    halt: str | None = None
    job_timeout: float | str | None = None
    speculate: bool = True

    def __post_init__(self) -> None:
        if self.job_timeout is not None:
            from worker_tasks.spec import InvalidMessage, check_timeout

            try:
                value = self.job_timeout
                if isinstance(value, str) and not value.endswith("%"):
                    value = float(value)  # --job-timeout 600 from the command line
                object.__setattr__(self, "job_timeout", check_timeout(value, "--job-timeout"))
            except (InvalidMessage, ValueError) as err:
                raise InvalidJobsError(str(err) if isinstance(err, InvalidMessage) else
                                       f"--job-timeout {self.job_timeout!r}: give seconds or "
                                       f"a percentage of the median, e.g. 300%") from None
        if self.halt is not None:
            from worker_tasks.halt import Halt, HaltSyntaxError

            try:
                Halt.parse(self.halt)
            except HaltSyntaxError as err:
                raise InvalidJobsError(str(err)) from None
        object.__setattr__(self, "after_runs", tuple(self.after_runs))
        object.__setattr__(self, "workdir", Path(self.workdir))
        if self.scripts_dir is not None:
            object.__setattr__(self, "scripts_dir", Path(self.scripts_dir))

    def but(self, **changes: Any) -> SubmitOptions:
        """A copy with some settings changed."""
        return replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> SubmitOptions:
        """The options of a parsed command line, ``overrides`` on top. A flag the command
        lacks, or one not given that defaults to None, keeps its default; a command with
        ``--inventory`` gets the inventory it names or finds (``find_inventory``)."""
        values = {option.name: getattr(args, option.name) for option in fields(cls)
                  if getattr(args, option.name, None) is not None}
        if hasattr(args, "inventory"):
            from coordinator.cluster.inventory import find_inventory

            values["inventory"] = find_inventory(args.inventory)
        return cls(**{**values, **overrides})


DEFAULTS = SubmitOptions()
