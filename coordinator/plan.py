"""Planning: from validated jobs to the exact messages each node will receive.

Path rewriting (the original tool's default): the value after ``--output-file``
becomes ``<output-dir>/<its basename>``. With ``preserve_paths`` the args pass
untouched (Step 5 writes where its args say).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from coordinator.errors import InvalidJobsError
from coordinator.jobs import Job
from coordinator.options import DEFAULTS, SubmitOptions
from coordinator.placement import AsFiled, FirstFreeSlot, Placement
from worker_tasks.copies import OUTPUT_FLAG, may_copy
from worker_tasks.spec import (
    BUILTIN_SCRIPTS_DIR,
    InvalidMessage,
    JobSpec,
    by_node,
    check_relative_path,
    done_path_for,
    is_floating,
)

if TYPE_CHECKING:
    from coordinator.legacy import Conversion



def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value after ``flag`` (or of ``flag=VALUE``) in a job's args, if any."""
    for index, arg in enumerate(args):
        if arg == flag and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def find_output_file(args: Sequence[str]) -> str | None:
    """The value after ``--output-file`` (or of ``--output-file=VALUE``), if any."""
    return flag_value(args, OUTPUT_FLAG)


def output_file_problem(args: Sequence[str]) -> str | None:
    """Why the job's ``--output-file`` can only fail later (no value, no file name), or None."""
    for index, arg in enumerate(args):
        if arg == OUTPUT_FLAG and index + 1 == len(args):
            return f"'{OUTPUT_FLAG}' is the last argument: it has no value"
        if arg == OUTPUT_FLAG or arg.startswith(OUTPUT_FLAG + "="):
            value = args[index + 1] if arg == OUTPUT_FLAG else arg.split("=", 1)[1]
            # "", "x/", "." and ".." all end in no file name.
            if posixpath.basename(value) in ("", ".", ".."):
                return (f"{OUTPUT_FLAG} {value!r} names no file (a file name is needed: its "
                        f".done marker goes beside it)")
    return None


def rewrite_output_path(args: Sequence[str], output_dir: str) -> list[str]:
    """Args with the ``--output-file`` value moved to ``<output_dir>/<basename>``."""
    out = list(args)
    for index, arg in enumerate(out):
        if arg == OUTPUT_FLAG and index + 1 < len(out):
            out[index + 1] = posixpath.join(output_dir, posixpath.basename(out[index + 1]))
        elif arg.startswith(OUTPUT_FLAG + "="):
            value = arg.split("=", 1)[1]
            out[index] = f"{OUTPUT_FLAG}={posixpath.join(output_dir, posixpath.basename(value))}"
    return out


@dataclass(frozen=True)
class Plan:
    """A prepared run: every job as its message, in jobs-file order, and how it was made.

    Parameters:
        run_id: the id the run will be recorded under.
        specs: the messages, in jobs-file order.
        options: the submission settings the plan was made with.
        pinned: jobs that never move (``"pin": true``).
        conversions: legacy inline-seed jobs, whose chunk files publishing writes.
        jobs_file: the jobs file's absolute path, when the jobs came from one.
        fingerprint: the digest of the messages and the output settings (``digest``).
    """

    run_id: str
    specs: list[JobSpec]
    options: SubmitOptions = DEFAULTS
    pinned: frozenset[str] = frozenset()
    conversions: tuple[Conversion, ...] = field(default=())
    jobs_file: str | None = None
    fingerprint: str = ""

    @property
    def output_dir(self) -> str:
        return self.options.output_dir

    @property
    def preserve_paths(self) -> bool:
        return self.options.preserve_paths

    def digest(self) -> str:
        """What the run will do, as a hash: every message but its run id, and where outputs
        go. Two plans of one jobs file with the same options share it, whatever their run
        ids: a re-started ``scripts-coordinator`` finds the run it had published. Taken
        while planning, from the message each job became (``fingerprint``)."""
        return self.fingerprint

    def jobs_per_node(self) -> dict[str, int]:
        return {node: len(specs) for node, specs in self.by_node().items()}

    def jobs_per_slot(self) -> dict[str, int]:
        """Jobs per slot (node, or node's GPU in per-GPU runs), in slot order."""
        return dict(sorted(Counter(spec.slot for spec in self.specs).items()))

    def slots(self) -> list[str]:
        """Where jobs run one at a time: nodes, or nodes' GPUs in per-GPU runs."""
        return sorted({spec.slot for spec in self.specs})

    def by_node(self) -> dict[str, list[JobSpec]]:
        return by_node(self.specs)

    def describe(self) -> str:
        """The dry-run text: jobs per node with their final paths."""
        lines = [
            f"plan: {len(self.specs)} jobs on {len(self.by_node())} nodes; output dir "
            f"{self.output_dir}; paths {'preserved' if self.preserve_paths else 'rewritten'}"
        ]
        for node, specs in self.by_node().items():
            if specs and specs[0].floating:
                lines.append(f"node {node} (queue {specs[0].queue}): {len(specs)} jobs, each "
                             f"floats to the first free "
                             f"{'GPU' if specs[0].per_gpu else 'node'}")
            elif specs and specs[0].per_gpu:
                queues = ", ".join(sorted({spec.queue for spec in specs}))
                lines.append(f"node {node} ({queues}): {len(specs)} jobs, one at a time per GPU")
            else:
                lines.append(f"node {node} (queue node.{node}): {len(specs)} jobs, run one at "
                             f"a time")
            for spec in specs:
                lines.append(
                    f"  {spec.job_id}  gpu {spec.gpu_id}  {spec.script} {' '.join(spec.args)}"
                )
                lines.append(f"      output {spec.output_file or '-'}  done {spec.done_file}")
                if spec.after:
                    lines.append(f"      after {', '.join(spec.after)}")
        if any(spec.after for spec in self.specs):
            lines.append("levels (a job starts once every job it names has succeeded):")
            for number, level in enumerate(self.levels()):
                lines.append(f"  level {number}: " + ", ".join(
                    f"{spec.job_id} (after {', '.join(spec.after)})" if spec.after
                    else spec.job_id for spec in level))
        return "\n".join(lines)

    def levels(self) -> list[list[JobSpec]]:
        """The jobs by how many waits stand before them: level 0 waits for nothing, a job
        of level n waits for one of level n - 1 (the file is checked: no cycles)."""
        level: dict[str, int] = {}
        by_id = {spec.job_id: spec for spec in self.specs}
        for spec in self.specs:
            stack = [spec.job_id]
            while stack:  # iterative: a chain of any length
                job_id = stack[-1]
                waits = [name for name in by_id[job_id].after if name not in level]
                if waits:
                    stack.extend(waits)
                    continue
                stack.pop()
                level[job_id] = 1 + max((level[name] for name in by_id[job_id].after),
                                        default=-1)
        rows: list[list[JobSpec]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
        for spec in self.specs:
            rows[level[spec.job_id]].append(spec)
        return rows


def checked(where: str, message: dict[str, Any]) -> JobSpec:
    """The message as the worker will check it, checked here by the same rules: a job the
    workers would refuse is refused before anything is published."""
    try:
        return JobSpec.from_message(message)
    except InvalidMessage as err:
        raise InvalidJobsError(f"{where}: {err} (the workers would refuse this job)") from None


class Fingerprint:
    """The digest of a plan, taken message by message as each job is planned."""

    def __init__(self, output_dir: str, preserve_paths: bool) -> None:
        self.hashed = hashlib.sha256(orjson.dumps([output_dir, preserve_paths]))

    def add(self, message: dict[str, Any]) -> None:
        # Every field but the run id: two plans of one file share it, whatever their ids.
        self.hashed.update(orjson.dumps({**message, "run_id": ""}, option=orjson.OPT_SORT_KEYS))

    def hexdigest(self) -> str:
        return self.hashed.hexdigest()


def check_script_present(where: str, script: str, scripts_dir: Path) -> None:
    """The script is in ``scripts_dir`` or among the built-in scripts, where a worker looks."""
    if not any((base / script).is_file() for base in (scripts_dir, BUILTIN_SCRIPTS_DIR)):
        raise InvalidJobsError(f"{where}: field 'script': {script!r} not found in scripts "
                               f"directory {scripts_dir.resolve()} (see --scripts-dir)")


def check_output_dir(output_dir: str) -> str:
    """The output directory is relative to the workers' workdir, and stays inside it."""
    try:
        return check_relative_path(output_dir, "--output-dir")
    except InvalidMessage as err:
        raise InvalidJobsError(f"{err}: outputs land under each worker's workdir; give a "
                               f"path relative to it") from None


def plan_jobs(jobs: Iterable[Job], run_id: str, options: SubmitOptions = DEFAULTS) -> Plan:
    """Rewrite paths and derive markers; refuse outputs outside the workdir, or shared.

    ``jobs`` may be a generator: each job is planned and let go as it comes.
    """
    output_dir, preserve_paths = options.output_dir, options.preserve_paths
    check_output_dir(output_dir)
    placement: Placement = FirstFreeSlot() if options.balance else AsFiled()
    fingerprint = Fingerprint(output_dir, preserve_paths)
    specs: list[JobSpec] = []
    writers: dict[str, tuple[int, str]] = {}
    pinned: set[str] = set()
    for index, job in enumerate(jobs):
        if job.pin:
            pinned.add(job.job_id)
        where = f"jobs: job {index} (job_id {job.job_id!r})"
        problem = output_file_problem(job.args)
        if problem:
            raise InvalidJobsError(f"{where}: field 'args': {problem}")
        if options.scripts_dir is not None:
            check_script_present(where, job.script, options.scripts_dir)
        args = list(job.args) if preserve_paths else rewrite_output_path(job.args, output_dir)
        node = job.node if job.pin else placement.place(job.job_id, job.node)
        output = find_output_file(args)
        if output is not None:
            try:
                check_relative_path(output, "output file")
            except InvalidMessage as err:
                raise InvalidJobsError(
                    f"jobs: job {index} (job_id {job.job_id!r}): field 'args': {err} (outputs "
                    f"must stay under the workers' workdir)") from None
        done = done_path_for(output, output_dir, job.job_id)
        normal = posixpath.normpath(done)
        if normal in writers:
            other_index, other_id = writers[normal]
            shared = f"output {output!r}" if output else f"marker {done!r}"
            raise InvalidJobsError(
                f"jobs: job {index} (job_id {job.job_id!r}): field 'args': {shared} is also "
                f"written by job {other_index} (job_id {other_id!r})"
            )
        writers[normal] = (index, job.job_id)
        # The job becomes its message once: checked by the workers' rules, then hashed.
        message = {
            "run_id": run_id,
            "job_id": job.job_id,
            "script": job.script,
            "args": args,
            "node": node,
            "gpu_id": job.gpu_id,
            "output_file": output,
            "done_file": done,
            "log_file": posixpath.join(output_dir, "logs", f"{job.job_id}.log"),
            "timeout": job.timeout if job.timeout is not None else options.job_timeout,
            "env": dict(job.env),
            "retries": job.retries if job.retries is not None else options.retries,
            "retry_delay": (job.retry_delay if job.retry_delay is not None
                            else options.retry_delay),
            "per_gpu": options.per_gpu,
            "warm": job.warm,
            "task_id": None,
        }
        if job.after:
            message["after"] = list(job.after)
        if job.cost is not None:
            message["cost"] = job.cost
        # A job that may have a backup copy says so: its worker writes its output apart.
        wanted = job.speculate if job.speculate is not None else options.speculate
        if may_copy(is_floating(node), wanted, options.per_gpu, output, args):
            message["speculate"] = True
        elif not wanted:
            message["speculate"] = False
        specs.append(checked(where, message))
        fingerprint.add(message)
    return Plan(run_id=run_id, specs=specs, options=options, pinned=frozenset(pinned),
                fingerprint=fingerprint.hexdigest())
