"""Backup copies of a straggling job: which jobs may have one, and what keeps two
executions of one job apart.

The head's scheduler starts a copy of a running job on an idle slot
(``coordinator.scheduler``); the job's own execution and its copy then race, and the first to
succeed claims the job (``JobTracker.claim_copy`` or ``finish``, one atomic step each). Their
outputs never mix: each execution writes its ``--output-file`` to a hidden path of its own
(``private_output``), and only the winner's is moved into place, after its claim. A job is
copied only when its outputs can be kept apart this way:

* it floats (its message names no node): a pinned job never moves;
* its output file is named by ``--output-file`` exactly once among its arguments, so both
  executions write where the worker says;
* it does not say ``"speculate": false`` (nor its run ``--no-speculate``);
* its run is not per GPU.

The head decides this once, as it plans the job, and says so in its message
(``"speculate": true``): the worker then writes that job's output apart, wherever the job
runs, and the scheduler copies only such jobs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import PurePosixPath

# The flag that names a job's output file among its arguments (the original tool's).
OUTPUT_FLAG = "--output-file"


def output_places(args: Sequence[str], output_file: str) -> list[int]:
    """Where ``output_file`` is named by ``--output-file`` among ``args`` (indexes of the
    value, or of a ``--output-file=VALUE`` argument)."""
    places = []
    for index, arg in enumerate(args):
        if arg == OUTPUT_FLAG and index + 1 < len(args) and args[index + 1] == output_file:
            places.append(index + 1)
        elif arg == f"{OUTPUT_FLAG}={output_file}":
            places.append(index)
    return places


def outputs_apart(output_file: str | None, args: Sequence[str]) -> bool:
    """Two executions of the job can be given outputs of their own: ``--output-file`` names
    its output exactly once."""
    return output_file is not None and len(output_places(args, output_file)) == 1


def may_copy(floating: bool, wanted: bool, per_gpu: bool, output_file: str | None,
             args: Sequence[str]) -> bool:
    """Whether a job may have a backup copy (module docstring); ``wanted``: neither the job
    nor its run turned copies off."""
    return floating and wanted and not per_gpu and outputs_apart(output_file, args)


def private_output(output_file: str, task_id: str) -> str:
    """Where one execution (one message, ``task_id``) writes the job's output: hidden beside
    it, the suffix kept (a ``.json`` output is checked as JSON). ``o/x.json`` under message
    ``r.x.0`` is ``o/.x.json.part-0.json``."""
    path = PurePosixPath(output_file)
    generation = task_id.rsplit(".", 1)[-1]
    if not (generation.isdigit() and len(generation) <= 12):  # a task id of other shape
        generation = hashlib.sha256(task_id.encode()).hexdigest()[:12]
    return str(path.with_name(f".{path.name}.part-{generation}{path.suffix}"))


def with_output(args: Sequence[str], output_file: str, private: str) -> list[str]:
    """``args`` with the job's one ``--output-file`` value replaced by ``private``."""
    out = list(args)
    for index in output_places(args, output_file):
        out[index] = private if out[index] == output_file else f"{OUTPUT_FLAG}={private}"
    return out
