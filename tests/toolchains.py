"""External references the suite compares against: required under CI, skipped (saying so) elsewhere.

The JDK (java.util.Random), a C++ compiler (std::mt19937, std::minstd_rand, the kernel
harness) and OpenSSH's sshd are the project's references; `tools/install-test-deps`
installs them. Under ``CI=true`` a missing one fails the test instead of skipping it,
so CI never passes without having run them. The GPU parity test is the one allowed skip.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require(*tools: str, purpose: str) -> None:
    """Fail under CI, skip elsewhere, when one of ``tools`` is not on PATH or at its path."""
    missing = [tool for tool in tools if not (shutil.which(tool) or os.path.exists(tool))]
    if not missing:
        return
    message = (f"{', '.join(missing)} not found: needed for {purpose} "
               f"(tools/install-test-deps installs it)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
