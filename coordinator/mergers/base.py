"""What every merge step is: the ``Merger`` protocol and its ``MergeResult``."""

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
