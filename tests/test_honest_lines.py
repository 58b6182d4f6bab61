"""The numbers a user reads agree with what happened (issue 32, item 4): the makespan counts
work, not idle gaps; the headline adds up with the table; progress counts from 0; the
engine line names what is missing once. In-process: the records are made here."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from coordinator.collector import Collection, build_summary, busy_time, render
from coordinator.progress import ProgressDisplay
from coordinator.records import JobRecord, status_from
from scoring import gpu
from worker_tasks.tracking import JobState

INFO = {"state": "active", "output_dir": "out", "created_at": 1000.0}


def ran(job_id: str, *spans: tuple[float, float], state: JobState = JobState.SUCCEEDED,
        node: str = "rig-a") -> JobRecord:
    history = [{"started_at": start, "finished_at": end} for start, end in spans]
    return JobRecord(job_id=job_id, node=node, state=state, history=history,
                     started_at=spans[-1][0] if spans else None,
                     finished_at=spans[-1][1] if spans else None,
                     duration_s=(spans[-1][1] - spans[-1][0]) if spans else None)


def test_the_makespan_of_a_retried_run_counts_work_not_the_gap_before_the_retry() -> None:
    # Two jobs ran 1000-1002 (overlapping); one failed and was retried 100 s later for 1 s.
    jobs = [ran("a", (1000.0, 1002.0)), ran("b", (1000.5, 1001.5), (1101.0, 1102.0))]
    assert busy_time(jobs) == pytest.approx(3.0)
    summary = build_summary(status_from("r", INFO, jobs), jobs)
    assert summary["makespan_s"] == 3.0
    # Without gaps it is the span from the first start to the last end.
    assert busy_time([ran("a", (10.0, 12.0)), ran("b", (11.0, 15.0))]) == pytest.approx(5.0)
    assert busy_time([ran("skipped", state=JobState.SKIPPED)]) == 0.0


def test_a_resumed_runs_headline_adds_up_with_its_table(tmp_path: Path) -> None:
    jobs = [ran(f"s{i}", state=JobState.SKIPPED) for i in range(7)] + [ran("r", (5.0, 7.0))]
    summary = build_summary(status_from("r", INFO, jobs), jobs)
    summary.update(report="report.html", merged={})
    lines = render(Collection(summary, tmp_path / "run_summary.json", [],
                              status_from("r", INFO, jobs))).splitlines()
    assert lines[0] == ("run r: 8/8 succeeded (100%), 7 of them skipped (their .done existed), "
                        "makespan 2.0 s (time with a job running)")
    assert lines[2].split() == ["rig-a", "8", "1", "0", "7", "2.0"]  # ok 1 + skipped 7 = 8


def test_progress_lines_count_from_zero_one_end_at_a_time() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, live=False)
    # The first snapshot already holds two ends and a running job.
    display(status_from("r", INFO, [ran("a", (1.0, 2.0)), ran("b", (1.0, 3.0)),
                                    ran("c", state=JobState.RUNNING)]))
    counts = [line.rsplit("(", 1)[1] for line in stream.getvalue().splitlines()]
    assert counts == ["1/3)", "2/3)", "2/3)"]


def test_the_engine_line_names_what_is_missing_once(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # not installed
    with pytest.raises(gpu.GpuUnavailable) as missing:
        gpu.probe()
    assert str(missing.value) == "cupy is not installed"
    # Installed, but a module it needs is not: that module is named, once.
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("import fastrlock_not_here\n")
    monkeypatch.delitem(sys.modules, "cupy")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(gpu.GpuUnavailable) as broken:
        gpu.probe()
    assert str(broken.value) == "cupy cannot be imported: it needs fastrlock_not_here"
