"""Step 3 merge: every chunk's scores into ``survivors_with_scores.json``."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.files import write_json_atomically
from coordinator.mergers.base import MergeResult

if TYPE_CHECKING:
    from coordinator.records import JobRecord

MERGED_NAME = "survivors_with_scores.json"
SCORING_SCRIPTS = {"full_scoring_worker.py", "full-scoring-worker"}
TOP_N = 10  # rows printed after the merge
PARAMETERS = ("prng_type", "mod", "skip", "n_draws")
# The shape of survivors_with_scores.json (docs/step3.md, "The merged Step 3 file"): it only
# grows fields; a change that breaks a reader gets a new number.
FORMAT_VERSION = 1


class ScoringMerger:
    """Merges full-scoring chunk outputs, sorted by score (descending) then seed."""

    kind = "scoring"

    def claims(self, job: JobRecord) -> bool:
        return posixpath.basename(job.script) in SCORING_SCRIPTS

    def merge(self, jobs: list[JobRecord], output_dir: Path, workdir: Path) -> MergeResult:
        results: list[dict[str, Any]] = []
        parameters: dict[str, Any] = {}
        mixed = False
        for job in jobs:
            if not job.output_file:
                continue
            with open(workdir / job.output_file, "rb") as fh:
                document = json.load(fh)
            params = {name: document.get(name) for name in PARAMETERS}
            if parameters and params != parameters:
                mixed = True
            parameters = parameters or params
            results.extend(document.get("results", []))
        results.sort(key=lambda record: (-record["score"], record["seed"]))
        merged = {"format_version": FORMAT_VERSION, **parameters, "mixed_parameters": mixed,
                  "chunks": len(jobs), "n_seeds": len(results), "results": results}
        path = write_json_atomically(workdir / output_dir / MERGED_NAME, merged)
        lines = [f"merged {len(results)} seeds from {len(jobs)} chunks into "
                 f"{output_dir / MERGED_NAME}", f"top {min(TOP_N, len(results))} by score:",
                 f"  {'rank':>4}  {'seed':>20}  {'matches':>7}  {'score':>8}"]
        for rank, record in enumerate(results[:TOP_N], start=1):
            lines.append(f"  {rank:>4}  {record['seed']:>20}  {record['matches']:>7}  "
                         f"{record['score']:>8.4f}")
        top = results[:TOP_N]
        return MergeResult(kind=self.kind, path=path, lines=lines,
                           details={"file": str(output_dir / MERGED_NAME),
                                    "n_seeds": len(results), "top": top})
