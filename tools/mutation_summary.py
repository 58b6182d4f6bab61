"""Score of a mutmut run, and the diff of every mutant that was not killed.

Reads ``mutmut results --all true`` on stdin (lines ``name: status``).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

DETECTED = {"killed", "timeout"}  # a mutant that hangs the tests is caught too


def main() -> int:
    statuses: dict[str, str] = {}
    for line in sys.stdin:
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status
    counts = Counter(statuses.values())
    tested = sum(n for status, n in counts.items() if status != "no tests")
    detected = sum(counts[status] for status in DETECTED)
    for name, status in sorted(statuses.items()):
        if status in DETECTED:
            continue
        print(f"== {name}: {status}")
        diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name],
                              capture_output=True, text=True).stdout
        print("\n".join(line for line in diff.splitlines()
                        if line[:1] in "+-" and line[:3] not in ("+++", "---")))
    print(f"\n{len(statuses)} mutants: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
    if tested:
        print(f"score: {detected}/{tested} mutants with a covering test detected "
              f"({100 * detected / tested:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
