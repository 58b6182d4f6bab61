"""Step 3 scoring script, where the original jobs files expect it (scripts directory).

The code lives in ``scoring.worker``; this file keeps ``script:
"full_scoring_worker.py"`` in existing jobs files working unchanged.
"""

import sys

from scoring.worker import main

if __name__ == "__main__":
    sys.exit(main())
