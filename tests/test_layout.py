"""The architecture holds: imports go one way, head node -> worker -> nothing of ours."""

from __future__ import annotations

import subprocess
import sys

import pytest


def imported_after(module: str) -> set[str]:
    code = (f"import sys, {module}; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(out.stdout.split())


@pytest.mark.parametrize(("module", "forbidden"), [
    ("worker_tasks", {"coordinator", "scoring"}),
    ("scoring.worker", {"coordinator", "worker_tasks", "celery"}),
    ("full_scoring_worker", {"coordinator", "worker_tasks", "celery"}),
])
def test_lower_layers_do_not_import_upper_ones(module: str, forbidden: set[str]) -> None:
    assert not imported_after(module) & forbidden


def test_the_python_api_is_importable_from_the_package() -> None:
    import coordinator

    for name in ("submit", "get_run", "Run", "RunStatus", "JobState", "ExitCode"):
        assert hasattr(coordinator, name)
