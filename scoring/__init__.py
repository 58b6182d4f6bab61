"""Step 3 workload: score candidate PRNG seeds against a draw history (CuPy or CPU).

This package imports neither the head node (``coordinator``) nor the worker
(``worker_tasks``): it is the script that they run.
"""

from scoring.prng import PRNG_TYPES, reference_draws, reference_matches

__all__ = ["PRNG_TYPES", "reference_draws", "reference_matches"]
