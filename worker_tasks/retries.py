"""The retry policy: whether a failed attempt runs again, and after how long.

Exponential backoff with jitter, capped: the wait after attempt ``n`` is
``base_delay * 2^(n-1) * U(0.5, 1.5)``, at most ``MAX_BACKOFF_S``. Attempts
are retried on the same node (the job's node lease is held meanwhile).
"""

from __future__ import annotations

import random

# The longest wait between two attempts, whatever the backoff says (seconds).
MAX_BACKOFF_S = 600.0
# Bounds of the jitter factor: a fleet of failed jobs does not retry in lockstep.
JITTER = (0.5, 1.5)


class Retries:
    """One job's retry policy.

    Parameters:
        retries: how many failed attempts are retried (0: none).
        base_delay: the wait after the first failed attempt, before jitter (seconds).
        max_delay: the cap on any wait (seconds).
    """

    def __init__(self, retries: int, base_delay: float, max_delay: float = MAX_BACKOFF_S) -> None:
        self.retries = retries
        self.base_delay = base_delay
        self.max_delay = max_delay

    def after_failure(self, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, once attempt ``attempt`` (from 1) failed;
        None when it was the last one allowed."""
        if attempt > self.retries:
            return None
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1) * random.uniform(*JITTER))
