"""Merge steps: what the collector does with a run's outputs, per kind of job.

A merger claims the jobs of its kind (``claims``) and combines their outputs
(``merge``) into one file; jobs no merger claims get only the generic summary.
Add a kind with ``register(MyMerger())``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator.records import JobRecord


@dataclass(frozen=True)
class MergeResult:
    """What a merger produced: the file, lines to print, facts for the summary."""

    kind: str
    path: Path
    lines: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Merger(Protocol):
    kind: str

    def claims(self, job: JobRecord) -> bool:
        """True for the jobs this merger combines."""
        ...

    def merge(self, jobs: list[JobRecord], output_dir: Path, workdir: Path) -> MergeResult:
        """Combine the outputs of the succeeded ``jobs`` into a file under ``output_dir``."""
        ...


MERGERS: list[Merger] = []


def register(merger: Merger) -> Merger:
    MERGERS.append(merger)
    return merger


from coordinator.mergers.scoring import ScoringMerger  # noqa: E402  (registers itself below)

register(ScoringMerger())

__all__ = ["MERGERS", "MergeResult", "Merger", "ScoringMerger", "register"]
