"""The jobs file: the input contract of the original tool, validated all or nothing.

A jobs file is a JSON list of objects (see DESIGN.md). ``load_jobs`` either
returns every job, valid, or raises ``InvalidJobsError`` with one line that
names the file, the job (index and job_id) and the field. Unknown keys are
ignored so that files written for the original tool keep working.

Two kinds of entry are accepted:

* a script job (``script`` + ``args``), the original format;
* a legacy scoring job (``seeds`` inline, no ``script``), from the deprecated
  coordinator; it is converted into a script job by ``coordinator.legacy``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from coordinator.errors import InvalidJobsError
from worker_tasks import spec as rules
from worker_tasks.spec import SAFE_NAME

logger = logging.getLogger("coordinator")

__all__ = ["SAFE_NAME", "Job", "LegacyScoringJob", "load_jobs", "load_jobs_file", "parse_jobs"]


def _rule(check: Any, *args: Any) -> Any:
    """Run a shared rule; its message (without the field name, which pydantic adds) on failure."""
    try:
        return check(*args)
    except rules.InvalidMessage as err:
        raise ValueError(str(err).strip()) from None


def _safe_name(value: Any) -> Any:
    if isinstance(value, str):
        _rule(rules.check_name, value, "")
    return value


def _node_name(value: Any) -> Any:
    if isinstance(value, str):
        _rule(rules.check_node, value, "")
    return value


def _script_path(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        _rule(rules.check_text, value, "the script")
        path = PurePosixPath(value)
        if path.is_absolute() or value.startswith("~"):
            raise ValueError(f"{value!r} is absolute; give a path inside the scripts directory")
        if ".." in path.parts:
            raise ValueError(f"{value!r} climbs out of the scripts directory with '..'")
        _rule(rules.check_script, value, "the script")
    return value


def _arg_text(value: Any) -> Any:
    # Numbers are passed as text, as the original tool did; anything else is an error.
    if isinstance(value, bool):
        raise ValueError("booleans are not valid arguments; give a string")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a number to pass as text")
    if isinstance(value, int | float):
        value = str(value)
    if isinstance(value, str):
        _rule(rules.check_text, value, "the argument")
        if len(value) <= INTERN_MAX:  # "--mod", "1000": one copy for the whole run
            value = sys.intern(value)
    return value


def _job_env(value: Any) -> Any:
    return _rule(rules.check_env, value)


def _timeout(value: Any) -> Any:
    if value is not None:
        _rule(rules.check_timeout, value, "")
    return value


def _cost(value: Any) -> Any:
    return None if value is None else _rule(rules.check_cost, value)


def _retry_delay(value: Any) -> Any:
    if value is not None:
        _rule(rules.check_seconds, value, "", rules.MAX_RETRY_DELAY_S, True)
    return value


# Arguments this short are interned (flags and small values repeat in every job).
INTERN_MAX = 32

SafeName = Annotated[str, BeforeValidator(_safe_name)]
NodeName = Annotated[str, BeforeValidator(_node_name)]
ScriptPath = Annotated[str, BeforeValidator(_script_path)]
ArgText = Annotated[str, BeforeValidator(_arg_text)]
GpuId = Annotated[int, Field(ge=0, le=rules.MAX_GPU_ID)]
Timeout = Annotated[float | str | None, BeforeValidator(_timeout)]
RetryDelay = Annotated[float | None, BeforeValidator(_retry_delay)]
Retries = Annotated[int | None, Field(ge=0, le=rules.MAX_RETRIES)]


class Job(BaseModel):
    """One script job: run ``python <script> <args>`` on ``node`` with GPU ``gpu_id``.

    Parameters:
        job_id: unique in the file; a safe name, used in file names.
        script: path relative to the worker's scripts directory.
        args: arguments, as strings (numbers are converted).
        node: the node that must run the job (queue ``node.<node>``).
        gpu_id: the GPU index, exported as ``CUDA_VISIBLE_DEVICES``.
        timeout: optional extension: seconds before the script (and its children) is killed,
            or ``"P%"``: P percent of the median duration of the run's succeeded jobs of the
            same script, once 3 have succeeded (before that, no limit).
        env: optional extension: extra environment variables (allow-listed names).
        retries: optional extension: failed attempts retried on the same node (default:
            the command's ``--retries``).
        retry_delay: optional extension: base of the backoff between attempts (seconds).
        pin: optional extension: never moved to another node (``move``, ``--failover``).
        warm: optional extension: false starts the script's interpreter fresh on a worker
            that runs jobs warm (``worker --warm``); true asks for a warm start (default:
            the worker's setting).
        cost: optional extension: how much work the job is against the others of its
            script (the seeds of a chunk, say): slot speeds are learned per unit of it, and
            the tail of a run is placed by it (default: 1).
        speculate: optional extension: false: never start a backup copy of it (a job whose
            script has effects beside its output file, say); default: as the run says.
        after: optional extension: the job ids of this file it waits for; it runs once
            every one of them has succeeded, and ends without running if one fails for
            good or is cancelled (Slurm's ``afterok``).
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    job_id: SafeName
    script: ScriptPath
    args: list[ArgText] = Field(default_factory=list, max_length=rules.MAX_ARGS)
    node: NodeName
    gpu_id: GpuId = 0
    timeout: Timeout = None
    env: Annotated[dict[str, str], BeforeValidator(_job_env)] = Field(default_factory=dict)
    retries: Retries = None
    retry_delay: RetryDelay = None
    pin: bool = False
    warm: bool | None = None
    after: list[SafeName] = Field(default_factory=list, max_length=rules.MAX_AFTER)
    cost: Annotated[float | None, BeforeValidator(_cost)] = None
    speculate: bool | None = None


class LegacyScoringJob(BaseModel):
    """A scoring job of the deprecated coordinator: seeds inline, no script.

    Parameters:
        job_id: optional; ``legacy_<index>`` when absent.
        seeds: the candidate seeds (integers or objects with a ``seed``).
        prng_type, mod: as for the scoring script.
        train_history: a path to the history file, or the draws inline.
        node, gpu_id: as for a script job.
    """

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    job_id: SafeName | None = None
    seeds: list[Any] = Field(min_length=1)
    prng_type: str
    mod: int = Field(ge=1)
    train_history: str | list[int]
    node: NodeName
    gpu_id: GpuId = 0
    skip: int = Field(default=0, ge=0)
    timeout: Timeout = None
    retries: Retries = None
    pin: bool = False


def is_legacy_entry(entry: Any) -> bool:
    """A legacy scoring entry carries its seeds inline and names no script."""
    return isinstance(entry, dict) and "script" not in entry and "seeds" in entry


def _field_error(source: str, index: int, entry: dict[str, Any],
                 err: ValidationError) -> InvalidJobsError:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return InvalidJobsError(f"{source}: {who(index, entry)}: field '{field}': {message}")


def who(index: int, entry: dict[str, Any]) -> str:
    """``job 3 (job_id 'x')``: the job id shown only when it is a printable string.

    (A lone surrogate is not printable, so what is shown can always be encoded.)
    """
    job_id = entry.get("job_id")
    if isinstance(job_id, str) and job_id.isprintable() and len(job_id) <= 128:
        return f"job {index} (job_id {job_id!r})"
    return f"job {index}"


def parse_jobs(entries: Any, source: str = "jobs") -> list[Job | LegacyScoringJob]:
    """Validate a decoded jobs list; raise ``InvalidJobsError`` on the first problem.

    The list is emptied as it is validated (its entries become None).
    """
    return list(iter_jobs(entries, source))


def iter_jobs(entries: Any, source: str = "jobs") -> Iterator[Job | LegacyScoringJob]:
    """Each entry of a decoded jobs list, validated, in order (see ``parse_jobs``).

    A generator, so a 100,000-job file never holds its raw entries, their models and
    the plan made of them all at once; ``InvalidJobsError`` comes when the bad entry
    is reached (before anything is published: planning reads to the end first).
    """
    if not isinstance(entries, list):
        raise InvalidJobsError(
            f"{source}: expected a JSON list of job objects, got {type(entries).__name__}"
        )
    if not entries:
        raise InvalidJobsError(f"{source}: the jobs list is empty")
    first_index: dict[str, int] = {}
    waits: dict[str, list[str]] = {}  # job id -> the jobs it names in "after"
    unknown_seen: set[str] = set()
    warnings: list[str] = []  # said once the whole list is read: a refused file says one line
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidJobsError(
                f"{source}: job {index}: expected an object, got {type(entry).__name__}"
            )
        model = LegacyScoringJob if is_legacy_entry(entry) else Job
        try:
            job = model.model_validate(entry)
        except ValidationError as err:
            raise _field_error(source, index, entry, err) from None
        if isinstance(job, LegacyScoringJob) and job.job_id is None:
            job = job.model_copy(update={"job_id": f"legacy_{index:04d}"})
        assert job.job_id is not None
        if job.job_id in first_index:
            raise InvalidJobsError(
                f"{source}: job {index} (job_id {job.job_id!r}): field 'job_id': duplicate, "
                f"first used by job {first_index[job.job_id]}"
            )
        first_index[job.job_id] = index
        if isinstance(job, Job) and job.after:
            waits[job.job_id] = job.after
        warnings += unknown_fields(source, index, entry, model, unknown_seen)
        entries[index] = None  # the raw entry is done with: 100,000 of them weigh 100 MB
        yield job
    check_waits(source, waits, first_index)
    for line in warnings:
        logger.warning("%s", line)


def check_waits(source: str, waits: dict[str, list[str]], index: dict[str, int]) -> None:
    """Every job an ``after`` names is in the file, and no job waits for itself, however far
    round (``InvalidJobsError`` naming the job, and the cycle)."""
    for job_id, named in waits.items():
        if len(set(named)) != len(named):
            raise InvalidJobsError(f"{source}: job {index[job_id]} (job_id {job_id!r}): field "
                                   f"'after': a job is named twice")
        for other in named:
            if other not in index:
                raise InvalidJobsError(f"{source}: job {index[job_id]} (job_id {job_id!r}): "
                                       f"field 'after': no job {other!r} in this file")
    cycle = find_cycle(waits)
    if len(cycle) == 1:
        raise InvalidJobsError(f"{source}: job {index[cycle[0]]} (job_id {cycle[0]!r}): field "
                               f"'after': the job waits for itself")
    if cycle:
        raise InvalidJobsError(f"{source}: job {index[cycle[0]]} (job_id {cycle[0]!r}): field "
                               f"'after': a cycle: {' -> '.join([*cycle, cycle[0]])} (each "
                               f"waits for the next)")


def find_cycle(waits: dict[str, list[str]]) -> list[str]:
    """A cycle of ``waits`` (job -> the jobs it waits for), in order, or [] (iterative
    depth-first search: a chain of 100,000 jobs is no recursion limit)."""
    done: set[str] = set()
    for root in waits:
        if root in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(waits.get(root, ())))]
        path.append(root)
        on_path.add(root)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return path[path.index(child):]
            elif child not in done:
                stack.append((child, iter(waits.get(child, ()))))
                path.append(child)
                on_path.add(child)
    return []


def unknown_fields(source: str, index: int, entry: dict[str, Any],
                   model: type[BaseModel], seen: set[str]) -> list[str]:
    """What to say, once per field name, of a field this tool ignores: a typo must not pass
    silently. Unknown fields stay harmless (DESIGN.md): the job is not refused."""
    lines = []
    for name in sorted(set(entry) - set(model.model_fields) - seen):
        seen.add(name)
        meaning = "a typo? the fields are " + ", ".join(model.model_fields)
        lines.append(f"{source}: {who(index, entry)}: unknown field {name!r} ignored "
                     f"({meaning}); later jobs with it are not named")
    return lines


def load_jobs_file(path: str | Path) -> list[Job | LegacyScoringJob]:
    """Read and validate a jobs file; every error is one line naming the file."""
    return list(iter_jobs_file(path))


def iter_jobs_file(path: str | Path) -> Iterator[Job | LegacyScoringJob]:
    """Read a jobs file and validate its jobs one by one (a generator, see ``iter_jobs``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidJobsError(f"{path}: jobs file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidJobsError(f"{path}: cannot read jobs file: {err}") from None
    return iter_jobs(decode_json(text, str(path)), source=str(path))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose key repeats is ambiguous (JSON would keep the last): refused."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one object (which one is meant?)")
        seen[key] = value
    return seen


def decode_json(text: str, source: str) -> Any:
    """JSON as the jobs file contract allows it: no NaN/Infinity, sane nesting and numbers."""
    try:
        return json.loads(text, parse_constant=_no_constants,
                          object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise InvalidJobsError(
            f"{source}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:
        raise InvalidJobsError(f"{source}: invalid JSON: nested too deeply") from None
    except ValueError as err:  # NaN/Infinity, or an integer of thousands of digits
        reason = str(err)
        if "Exceeds the limit" in reason:
            reason = "a number has more than 4300 digits"
        raise InvalidJobsError(f"{source}: invalid JSON: {reason}") from None


def load_jobs(jobs: str | Path | Sequence[dict[str, Any]]) -> list[Job | LegacyScoringJob]:
    """Accept a jobs file path or an already decoded list of job dicts."""
    return list(iter_load_jobs(jobs))


def iter_load_jobs(jobs: str | Path | Sequence[dict[str, Any]],
                   ) -> Iterator[Job | LegacyScoringJob]:
    """``load_jobs`` as a generator."""
    if isinstance(jobs, str | Path):
        return iter_jobs_file(jobs)
    return iter_jobs(list(jobs))
