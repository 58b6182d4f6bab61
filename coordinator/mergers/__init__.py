"""Merge steps: what the collector does with a run's outputs, per kind of job.

A merger claims the jobs of its kind (``claims``) and combines their outputs
(``merge``) into one file; jobs no merger claims get only the generic summary.
Add a kind with ``register(MyMerger())``.
"""

from __future__ import annotations

from coordinator.mergers.base import Merger, MergeResult
from coordinator.mergers.scoring import ScoringMerger

MERGERS: list[Merger] = []


def register(merger: Merger) -> Merger:
    MERGERS.append(merger)
    return merger


register(ScoringMerger())

__all__ = ["MERGERS", "MergeResult", "Merger", "ScoringMerger", "register"]
