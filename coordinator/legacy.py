"""Legacy scoring jobs: seeds inline, no script (the deprecated coordinator's format).

Each one becomes a script job of ``full_scoring_worker.py``: its seeds (and an
inline history) go to files in the chunk directory, and the args say where.
Conversion is pure; ``write_chunks`` writes the files once the run is accepted.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.errors import InvalidJobsError
from coordinator.files import write_json_atomically
from coordinator.jobs import Job, LegacyScoringJob
from worker_tasks.spec import InvalidMessage, check_relative_path

SCORING_SCRIPT = "full_scoring_worker.py"


@dataclass(frozen=True)
class Conversion:
    """A legacy job converted: the script job, a line for --dry-run, files to write."""

    job: Job
    note: str
    files: dict[str, Any] = field(default_factory=dict)  # relative path -> JSON document


def convert(entry: LegacyScoringJob, index: int, chunk_dir: str, output_dir: str) -> Conversion:
    # The scoring checks (and NumPy) load only when a file has legacy jobs.
    from scoring.inputs import ScoringInputError, check_prng, parse_history, parse_seeds

    assert entry.job_id is not None  # the jobs loader names unnamed legacy jobs legacy_NNNN
    job_id = entry.job_id
    where = f"jobs: job {index} (job_id {job_id!r})"
    try:
        check_prng(entry.prng_type, entry.mod)
        parse_seeds(entry.seeds, entry.prng_type, source="field 'seeds'")
        if isinstance(entry.train_history, list):
            parse_history(entry.train_history, entry.mod, source="field 'train_history'")
        else:
            check_relative_path(entry.train_history, "train_history")
    except ScoringInputError as err:
        raise InvalidJobsError(f"{where}: legacy scoring job: {err}") from None
    except InvalidMessage as err:
        raise InvalidJobsError(f"{where}: field 'train_history': {err} (a path relative to "
                               f"the workers' workdir)") from None
    seeds_file = posixpath.join(chunk_dir, f"{job_id}.json")
    files: dict[str, Any] = {seeds_file: entry.seeds}
    history = entry.train_history
    if isinstance(history, list):
        files[posixpath.join(chunk_dir, f"{job_id}_history.json")] = history
        history = posixpath.join(chunk_dir, f"{job_id}_history.json")
    args = [
        "--seeds-file", seeds_file,
        "--train-history", history,
        "--output-file", posixpath.join(output_dir, f"{job_id}.json"),
        "--prng-type", entry.prng_type,
        "--mod", str(entry.mod),
    ]
    if entry.skip:
        args += ["--skip", str(entry.skip)]
    job = Job(job_id=job_id, script=SCORING_SCRIPT, args=args, node=entry.node,
              gpu_id=entry.gpu_id, timeout=entry.timeout, retries=entry.retries, pin=entry.pin)
    note = (f"legacy job {index} ({job_id}): {len(entry.seeds)} inline seeds -> {seeds_file}; "
            f"runs {SCORING_SCRIPT}")
    return Conversion(job=job, note=note, files=files)


def write_chunks(conversions: Sequence[Conversion], workdir: Path) -> None:
    """Write every converted job's files under ``workdir`` (atomically, each)."""
    for conversion in conversions:
        for relative, document in conversion.files.items():
            write_json_atomically(workdir / relative, document)
