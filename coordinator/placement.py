"""Where a job goes: the placement policies the head chooses between.

A policy answers one question, job by job: on which node's queue (or on the shared queue of
floating jobs, ``any``) is this job published? Planning asks it once per job at submit
time; the scheduler (``coordinator.scheduler``) asks it again when it moves jobs during a
run. Pinned jobs (``"pin": true``) never reach a policy: their callers keep them where the
jobs file puts them.

Today's policies:

* ``AsFiled``: the node the jobs file names (the original tool's rule).
* ``FirstFreeSlot``: the shared queue; the first worker that is free takes the job
  (``--balance``). Nobody needs to follow the run for this to work.
* ``LeastLoaded``: the target with the least work waiting (its queue and its running job),
  counting each job placed, so a batch spreads instead of piling onto the first target by
  name (``move``, ``--failover``).
* ``EarliestFinish``: the slot that would finish the job first, by the slots' learned speeds
  (``worker_tasks.speeds``) and when each is free: the tail of a followed run, where a slow
  slot taking the last job would make the whole run wait (``Scheduler.place_tail``).

And one rule for jobs already running: ``backup_copies`` picks the stragglers worth a backup
copy on an idle slot (LATE's rule: the longest time left first, onto the fastest idle slot),
for ``Scheduler.speculate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from worker_tasks.spec import FLOATING_NODE


class Placement(Protocol):
    """A placement policy: one decision per job."""

    def place(self, job_id: str, node: str) -> str:
        """The node (or ``any``) that job ``job_id``, filed for ``node``, is queued on."""
        ...


class AsFiled:
    """Each job on the node the jobs file names."""

    def place(self, job_id: str, node: str) -> str:
        return node


class FirstFreeSlot:
    """Each job floats: the first free worker (or GPU slot, per-GPU) takes it."""

    def place(self, job_id: str, node: str) -> str:
        return FLOATING_NODE


@dataclass
class LeastLoaded:
    """Each job to the target with the least work waiting; ties go by name.

    Parameters:
        targets: the nodes jobs may go to.
        loads: work already waiting per target (queued plus running); targets missing
            count as idle. Updated with every job placed.
    """

    targets: Sequence[str]
    loads: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("LeastLoaded needs at least one target")

    def place(self, job_id: str, node: str) -> str:
        target = min(self.targets, key=lambda name: (self.loads.get(name, 0), name))
        self.loads[target] = self.loads.get(target, 0) + 1
        return target


@dataclass
class EarliestFinish:
    """Each job to the slot whose finish time for it is earliest: when the slot is free,
    plus the job's cost at the slot's seconds per unit. Equal jobs on machines of fixed,
    known speeds: the placement that ends first.

    Parameters:
        free_at: slot -> when it is free (seconds from now: 0 when idle, else what its
            running job has left by its estimate). Updated with every job placed.
        seconds_per_unit: slot -> its estimate for the jobs' script.
        costs: job id -> its cost (1 when not given).
    """

    free_at: dict[str, float]
    seconds_per_unit: Mapping[str, float]
    costs: Mapping[str, float] = field(default_factory=dict)

    def place(self, job_id: str, node: str) -> str:
        cost = self.costs.get(job_id, 1.0)
        slot = min(self.free_at, key=lambda name: (
            self.free_at[name] + cost * self.seconds_per_unit[name], name))
        self.free_at[slot] += cost * self.seconds_per_unit[slot]
        return slot


# A copy starts only where it would end the job this many times sooner than its own slot.
COPY_MARGIN = 1.5
# At most this share of the slots run backup copies at once (and at least one slot may).
COPY_SHARE = 0.25


@dataclass(frozen=True)
class RunningJob:
    """A running job, as a backup copy is decided: where, how big, for how long so far."""

    job_id: str
    slot: str
    cost: float
    elapsed_s: float


# A job past its estimate by at most this share of it is about to end (its record says so a
# little after its script does); further past, its slot is slower than it was.
ENDING_MARGIN = 0.25


def time_left(job: RunningJob, seconds_per_unit: Mapping[str, float]) -> float:
    """What the job has left at its slot's learned speed. Just past its estimate (within
    ``ENDING_MARGIN``), nothing: it is ending. Further past, its slot is slower than it was:
    it is taken to be half way (as long again as it has run)."""
    expected = job.cost * seconds_per_unit[job.slot]
    if job.elapsed_s < expected:
        return expected - job.elapsed_s
    return 0.0 if job.elapsed_s <= expected * (1 + ENDING_MARGIN) else job.elapsed_s


def copy_budget(slots: int, live_copies: int) -> int:
    """How many more backup copies may start: ``COPY_SHARE`` of the slots, at least one."""
    return max(1, int(COPY_SHARE * slots)) - live_copies


def backup_copies(running: Sequence[RunningJob], idle: Sequence[str],
                  seconds_per_unit: Mapping[str, float], budget: int) -> dict[str, str]:
    """job id -> the idle slot its backup copy goes to: the jobs with the most time left
    first, each onto the fastest idle slot left, when that slot would finish it
    ``COPY_MARGIN`` times sooner than its own slot; at most ``budget`` copies. Slots without
    an estimate take no copy, and their jobs get none."""
    free = sorted((slot for slot in idle if slot in seconds_per_unit),
                  key=lambda slot: (seconds_per_unit[slot], slot))
    known = [job for job in running if job.slot in seconds_per_unit]
    chosen: dict[str, str] = {}
    for job in sorted(known, key=lambda job: -time_left(job, seconds_per_unit)):
        if len(chosen) >= budget or not free:
            break
        there = job.cost * seconds_per_unit[free[0]]
        if time_left(job, seconds_per_unit) > COPY_MARGIN * there:
            chosen[job.job_id] = free.pop(0)
    return chosen


def placed(policy: Placement, jobs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """job id -> where ``policy`` puts it, for ``(job_id, node)`` pairs in order."""
    return {job_id: policy.place(job_id, node) for job_id, node in jobs}


def loads_of(queued: Mapping[str, int], running: Mapping[str, int],
             targets: Sequence[str]) -> dict[str, int]:
    """Work waiting per target: its queue's length plus the jobs running there."""
    return {node: int(queued.get(node, 0)) + int(running.get(node, 0)) for node in targets}
