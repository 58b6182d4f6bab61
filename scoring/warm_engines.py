"""Import this module to have the scoring engines ready in this process before any job.

What a warm worker's parent imports (``coordinator worker --warm``, its default preload):
the compiled CPU engine's machine code for every PRNG, loaded from Numba's on-disk cache
(``Dispatcher.compile``: nothing runs, so no thread pool starts and a fork keeps it all),
and CuPy's modules when installed (importing CuPy does not initialise CUDA; a device query
would). Without Numba or CuPy it loads what there is: the NumPy engine then runs.
"""

from __future__ import annotations

import contextlib

from scoring import vectorized  # noqa: F401  (the NumPy engine, always there)


def load_compiled() -> bool:
    """Load the compiled loops (``compiled.load_all``); False where Numba is missing."""
    try:
        from scoring import compiled
    except ImportError:
        return False
    compiled.load_all()
    return True


COMPILED = load_compiled()
with contextlib.suppress(ImportError):
    import cupy  # noqa: F401
