"""Where a run's time went: one self-contained HTML page with an inline SVG timeline.

One row per node, one bar per attempt, coloured by outcome (succeeded, failed,
retried, skipped, cancelled); idle time is the empty space between bars. When
bars would be thinner than a pixel (thousands of jobs), each row is cut into
pixel-wide columns and each column shows how busy the node was and the
outcome that filled most of it. Above the timeline: the makespan, each node's
busy fraction, and the slowest jobs.

    coordinator report RUN --out report.html [--png report.png]
"""

from __future__ import annotations

import html
import math
import shutil
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Drawing geometry (pixels).
WIDTH = 1200
LABEL_WIDTH = 140
ROW_HEIGHT = 22
ROW_GAP = 6
AXIS_HEIGHT = 28
# At most this many steps of the time axis across the makespan.
MAX_TICKS = 10
# Outcome colours (colour-blind-safe palette), and the order the legend lists them in.
COLOURS = {"succeeded": "#2e7d32", "failed": "#c62828", "retried": "#ef6c00",
           "skipped": "#9e9e9e", "cancelled": "#6a1b9a", "running": "#1565c0"}
SLOWEST_SHOWN = 10
# How long chromium may take to render the PNG (seconds).
RENDER_TIMEOUT_S = 60


@dataclass(frozen=True)
class Bar:
    """One attempt on the timeline (seconds from the run's first start)."""

    row: str
    start: float
    end: float
    outcome: str
    job_id: str
    attempt: int


def attempt_bars(summary: dict[str, Any]) -> list[Bar]:
    """Every attempt of every job as a bar; a skipped job as a zero-length mark."""
    raw: list[tuple[str, float, float, str, str, int]] = []
    for job in summary["jobs"]:
        history = job.get("attempt_history") or []
        for index, attempt in enumerate(history):
            start = attempt.get("started_at")
            if start is None:
                continue
            end = attempt.get("finished_at") or start
            if attempt.get("error") is None:
                outcome = "succeeded"
            elif index < len(history) - 1:
                outcome = "retried"
            elif job["state"] == "cancelled":
                outcome = "cancelled"
            else:
                outcome = "failed"
            raw.append((job["node"], start, end, outcome, job["job_id"], index + 1))
        if not history and job.get("finished_at") and job["state"] in ("skipped", "cancelled"):
            moment = job["finished_at"]
            raw.append((job["node"], moment, moment, job["state"], job["job_id"], 0))
    if not raw:
        return []
    origin = min(start for _, start, *_ in raw)
    return [Bar(row, start - origin, end - origin, outcome, job_id, attempt)
            for row, start, end, outcome, job_id, attempt in raw]


def busy_fractions(bars: list[Bar], makespan: float) -> dict[str, float]:
    busy: dict[str, float] = defaultdict(float)
    for bar in bars:
        busy[bar.row] += bar.end - bar.start
    return {row: (busy[row] / makespan if makespan else 0.0) for row in sorted(busy)}


def row_svg(bars: list[Bar], y: float, scale: float) -> list[str]:
    """One row: a rect per bar, or per pixel column when bars are thinner than a pixel."""
    width_px = WIDTH - LABEL_WIDTH
    thin = sum(1 for bar in bars if (bar.end - bar.start) * scale < 1.0)
    if thin <= width_px // 4:
        parts = []
        for bar in bars:
            x = LABEL_WIDTH + bar.start * scale
            w = max(1.0, (bar.end - bar.start) * scale)
            title = (f"{bar.job_id} attempt {bar.attempt}: {bar.outcome}, "
                     f"{bar.end - bar.start:.2f} s")
            parts.append(f'<rect class="bar {bar.outcome}" x="{x:.1f}" y="{y:.1f}" '
                         f'width="{w:.1f}" height="{ROW_HEIGHT}" fill="{COLOURS[bar.outcome]}">'
                         f"<title>{html.escape(title)}</title></rect>")
        return parts
    # Aggregate: per pixel column, how much of it was busy and with what, mostly.
    columns: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for bar in bars:
        start_px, end_px = bar.start * scale, max(bar.end * scale, bar.start * scale + 0.2)
        column = int(start_px)
        while column < end_px and column < width_px:
            overlap = min(end_px, column + 1) - max(start_px, column)
            columns[column][bar.outcome] += max(overlap, 0.0)
            column += 1
    parts = []
    for column, by_outcome in sorted(columns.items()):
        outcome = max(by_outcome, key=lambda name: by_outcome[name])
        fill = min(1.0, sum(by_outcome.values()))
        parts.append(f'<rect class="column {outcome}" x="{LABEL_WIDTH + column}" y="{y:.1f}" '
                     f'width="1" height="{ROW_HEIGHT}" fill="{COLOURS[outcome]}" '
                     f'fill-opacity="{0.25 + 0.75 * fill:.2f}"/>')
    return parts


def axis_ticks(makespan: float) -> list[float]:
    """Ticks from 0 at a round step (1, 2 or 5 times a power of ten), at most
    ``MAX_TICKS`` + 1 of them, none past the makespan."""
    if makespan <= 0:
        return [0.0]
    magnitude = 10 ** math.floor(math.log10(makespan / MAX_TICKS))
    step = next(magnitude * factor for factor in (1, 2, 5, 10)
                if makespan / (magnitude * factor) <= MAX_TICKS)
    count = int(makespan / step + 1e-9)
    return [round(index * step, 10) for index in range(count + 1)]


def tick_label(tick: float) -> str:
    """``0``, ``0.5``, ``20``: no more digits than the tick has."""
    return f"{tick:.6f}".rstrip("0").rstrip(".")


def render_svg(summary: dict[str, Any]) -> str:
    bars = attempt_bars(summary)
    rows = sorted({bar.row for bar in bars} | set(summary.get("nodes", {})))
    makespan = max((bar.end for bar in bars), default=0.0)
    scale = (WIDTH - LABEL_WIDTH) / makespan if makespan > 0 else 1.0
    height = AXIS_HEIGHT + len(rows) * (ROW_HEIGHT + ROW_GAP) + 10
    by_row: dict[str, list[Bar]] = defaultdict(list)
    for bar in bars:
        by_row[bar.row].append(bar)
    busy = busy_fractions(bars, makespan)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
             f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
             f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>']
    for tick in axis_ticks(makespan):  # the time axis, at round steps
        x = LABEL_WIDTH + tick * scale
        parts.append(f'<line x1="{x:.1f}" y1="{AXIS_HEIGHT - 6}" x2="{x:.1f}" y2="{height}" '
                     f'stroke="#e0e0e0"/>')
        anchor = "start" if tick == 0 else "end" if x > WIDTH - 30 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{AXIS_HEIGHT - 10}" text-anchor="{anchor}">'
                     f'{tick_label(tick)} s</text>')
    for index, row in enumerate(rows):
        y = AXIS_HEIGHT + index * (ROW_HEIGHT + ROW_GAP)
        parts.append(f'<text class="row-label" x="4" y="{y + ROW_HEIGHT - 6}">'
                     f'{html.escape(row)} ({busy.get(row, 0.0):.0%})</text>')
        parts.append(f'<rect x="{LABEL_WIDTH}" y="{y}" width="{WIDTH - LABEL_WIDTH}" '
                     f'height="{ROW_HEIGHT}" fill="#f5f5f5"/>')
        parts.extend(row_svg(by_row[row], y, scale))
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(summary: dict[str, Any]) -> str:
    bars = attempt_bars(summary)
    makespan = max((bar.end for bar in bars), default=0.0)
    busy = busy_fractions(bars, makespan)
    slowest = sorted((bar for bar in bars if bar.end > bar.start),
                     key=lambda bar: bar.end - bar.start, reverse=True)[:SLOWEST_SHOWN]
    counts = ", ".join(f"{count} {state}" for state, count in summary["counts"].items() if count)
    legend = " ".join(f'<span class="key" style="background:{colour}"></span>{name}'
                      for name, colour in COLOURS.items())
    busy_rows = "".join(f"<tr><td>{html.escape(row)}</td><td>{fraction:.0%}</td></tr>"
                        for row, fraction in busy.items())
    slow_rows = "".join(f"<tr><td>{html.escape(bar.job_id)}</td><td>{html.escape(bar.row)}</td>"
                        f"<td>{bar.attempt}</td><td>{bar.end - bar.start:.2f} s</td>"
                        f"<td>{bar.outcome}</td></tr>" for bar in slowest)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>run {html.escape(summary["run_id"])}: where the time went</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #212121; }}
table {{ border-collapse: collapse; margin: 8px 24px 16px 0; display: inline-table;
        vertical-align: top; }}
td, th {{ border-bottom: 1px solid #e0e0e0; padding: 2px 10px; text-align: left; }}
.key {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; }}
</style></head><body>
<h1>run {html.escape(summary["run_id"])}</h1>
<p>{summary["jobs_total"]} jobs ({counts}); makespan <b>{makespan:.1f} s</b>;
{len(bars)} attempts on {len(busy)} nodes.</p>
<p>{legend}</p>
{render_svg(summary)}
<div>
<table><tr><th>node</th><th>busy</th></tr>{busy_rows}</table>
<table><tr><th>slowest jobs</th><th>node</th><th>attempt</th><th>time</th><th>outcome</th></tr>
{slow_rows}</table>
</div>
</body></html>
"""


def write_report(summary: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(summary), encoding="utf-8")
    tmp.replace(path)
    return path


def find_browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render_png(report: Path, png: Path, rows: int) -> Path:
    """Screenshot the report with a headless Chromium; ``RuntimeError`` if none is here."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("--png needs Chromium (Debian: apt-get install chromium)")
    height = 220 + rows * (ROW_HEIGHT + ROW_GAP) + 24 * (max(SLOWEST_SHOWN, rows) + 1)
    with tempfile.TemporaryDirectory(prefix="sc-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                   "--no-first-run", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={WIDTH + 60},{height}",
                   f"--screenshot={png.resolve()}", report.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=RENDER_TIMEOUT_S)
    if done.returncode != 0 or not png.exists():
        raise RuntimeError(f"Chromium could not render {report}: "
                           f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return png
