"""``--halt``: a run that stops itself, with GNU parallel's meaning.

    --halt soon,fail=3      no job starts once 3 jobs have failed; running ones finish
    --halt now,fail=10%     once 10% of the jobs ended so far have failed (at least 3
                            ended), running jobs are killed too
    --halt now,success=1    the first success ends the run (the rest are not needed)

The workers enforce it, so a run nobody follows halts too: the worker that records a
job's final state checks the run's counters against its halt (``Halt.reached``), and the
first to find it reached halts the run (``halt_run``, once: the run's ``halted`` field is
set with HSETNX). The jobs left end ``cancelled``, their error the halt's reason; with
``now`` the running ones are cancelled as ``cancel`` does it (their worker kills each
within a second, with everything it started, and writes no ``.done``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import redis

from worker_tasks.tracking import JobState, JobTracker, jobs_key, run_key

# A run's metadata: its halt (JSON), and once halted, why.
HALT_FIELD = "halt"
HALTED_FIELD = "halted"
# A percentage is judged once this many jobs have ended (GNU parallel's rule).
PERCENT_MIN_ENDED = 3
# What halts: the first word, and the condition.
HALT_TEXT = re.compile(r"(now|soon),(fail|success)=(\d+)(%?)\Z")


class HaltSyntaxError(ValueError):
    """A ``--halt`` that is not ``now|soon,fail|success=N|P%``."""


@dataclass(frozen=True)
class Halt:
    """When a run stops itself.

    Parameters:
        when: ``soon`` (no new job starts) or ``now`` (running jobs are killed too).
        on: ``fail`` or ``success``: which ended jobs count.
        count: that many jobs, or None with ``percent``.
        percent: that share of the jobs ended so far (once 3 have ended), or None.
    """

    when: str
    on: str
    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> Halt:
        match = HALT_TEXT.match(text.strip())
        if match is None:
            raise HaltSyntaxError(f"--halt {text!r}: give now|soon,fail=N|P% or "
                                  f"now|soon,success=N|P%, e.g. --halt soon,fail=3")
        when, on, number, percent = match.groups()
        value = int(number)
        if percent and not 0 < value <= 100:
            raise HaltSyntaxError(f"--halt {text!r}: a percentage is 1% to 100%")
        if not percent and value < 1:
            raise HaltSyntaxError(f"--halt {text!r}: the count is at least 1")
        return cls(when, on, None if percent else value, float(value) if percent else None)

    def text(self) -> str:
        amount = f"{self.count}" if self.count is not None else f"{self.percent:g}%"
        return f"{self.when},{self.on}={amount}"

    def as_dict(self) -> dict[str, object]:
        """What the run's metadata keeps (``Halt(**it)`` reads it back)."""
        return asdict(self)

    def reached(self, counts: Mapping[JobState, int]) -> bool:
        """The run's counters meet the condition."""
        counted = (counts.get(JobState.FAILED, 0) if self.on == "fail"
                   else counts.get(JobState.SUCCEEDED, 0))
        if self.count is not None:
            return counted >= self.count
        ended = sum(number for state, number in counts.items() if state.is_final)
        assert self.percent is not None
        return ended >= PERCENT_MIN_ENDED and counted >= math.ceil(ended * self.percent / 100)

    def reason(self, counts: Mapping[JobState, int]) -> str:
        ended = sum(number for state, number in counts.items() if state.is_final)
        counted = (counts.get(JobState.FAILED, 0) if self.on == "fail"
                   else counts.get(JobState.SUCCEEDED, 0))
        what = "failed" if self.on == "fail" else "succeeded"
        return f"halted (--halt {self.text()}): {counted} of {ended} ended jobs {what}"


def check(tracking: redis.Redis, run_id: str) -> str | None:
    """Halt the run if its halt is reached and it is not halted yet: the reason, or None."""
    raw, halted = tracking.hmget(run_key(run_id), [HALT_FIELD, HALTED_FIELD])
    if raw is None or halted is not None:
        return None
    halt = Halt(**json.loads(raw))
    tracker = JobTracker(tracking)
    counts = tracker.counts(run_id)
    if not halt.reached(counts):
        return None
    reason = halt.reason(counts)
    if not tracking.hsetnx(run_key(run_id), HALTED_FIELD, json.dumps(reason)):
        return None  # another worker halts it
    halt_run(tracker, run_id, reason, kill=halt.when == "now")
    return reason


def halt_run(tracker: JobTracker, run_id: str, reason: str, kill: bool) -> int:
    """End the jobs that have not started (and, with ``kill``, the running ones) with
    ``reason``; returns how many."""
    job_ids = [raw.decode() for raw in tracker.client.lrange(jobs_key(run_id), 0, -1)]
    ended = 0
    for job_id in job_ids:
        ended += tracker.halt(run_id, job_id, reason, kill).ok
    return ended
