"""The CPU backend: chunks of seeds, each scored by the engine that suits its size.

Two engines give identical matches:

* ``vectorized`` (``scoring.vectorized``): NumPy array operations, no start-up cost;
* ``compiled`` (``scoring.compiled``): Numba loops on all cores, 4.7x faster on
  2 cores, but loading them costs about 0.7 s per process.

``engine="auto"`` takes the compiled loops once a call has at least
``COMPILED_MIN_WORK`` steps to do (seed-draws, plus mt19937's 1,248 steps a
seed to seed and twist its state), and the vectorised code below that; where
the loops are loaded already (a warm worker's zygote loaded them), from
``COMPILED_MIN_WORK_LOADED`` steps (starting their thread pool is all they cost).
Memory stays bounded by the chunk size, whatever the number of seeds.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np

from scoring import vectorized
from scoring.states import initial_states, java_magic

ENGINES = ("auto", "compiled", "vectorized")
# Seeds per call into an engine; bounds the temporary arrays (mt19937 keeps 624 words a seed).
CHUNK_SEEDS = {"compiled": 1 << 20, "vectorized": 1 << 16, "vectorized_mt19937": 1 << 13}
# Below this many PRNG steps the compiled engine does not pay back its load time.
# Measured on 2 cores: load 0.7 s; java_lcg 139 M steps/s vectorised, 646 M compiled.
COMPILED_MIN_WORK = 100_000_000
# The same once its code is loaded (a warm worker's zygote did it): what is left to pay
# back is starting its thread pool in this process, about 0.1 s (break-even 18 M steps).
COMPILED_MIN_WORK_LOADED = 20_000_000
MT_SETUP_STEPS = 2 * 624  # seeding plus the first twist, per seed

__all__ = ["ENGINES", "choose_engine", "initial_states", "java_magic", "matches"]


def load_compiled() -> ModuleType | None:
    """``scoring.compiled``, or None where Numba is missing (auto then stays vectorised)."""
    try:
        from scoring import compiled  # imports Numba: only when it pays
    except ImportError:
        return None
    return compiled


def choose_engine(prng_type: str, n_seeds: int, n_steps: int, engine: str = "auto") -> str:
    """The engine for ``n_seeds`` seeds of ``n_steps`` draws each (skip included)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown CPU engine {engine!r}; choose {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    per_seed = n_steps + (MT_SETUP_STEPS if prng_type == "mt19937" else 0)
    # A warm worker's zygote loaded the compiled code: only its thread pool's start is left.
    threshold = COMPILED_MIN_WORK_LOADED if compiled_loaded() else COMPILED_MIN_WORK
    return "compiled" if n_seeds * per_seed >= threshold else "vectorized"


def compiled_loaded() -> bool:
    """Whether the compiled loops are already loaded here (``scoring.warm_engines``)."""
    compiled = sys.modules.get("scoring.compiled")
    return bool(getattr(compiled, "LOADED", False))


def matches(
    prng_type: str, seeds: np.ndarray, history: np.ndarray, mod: int, skip: int = 0,
    chunk: int | None = None, engine: str = "auto",
) -> np.ndarray:
    """Matches per seed (int32): seeds scored ``chunk`` at a time by ``engine``."""
    hist = np.ascontiguousarray(history, dtype=np.int64)
    used = choose_engine(prng_type, seeds.shape[0], skip + hist.shape[0], engine)
    compiled = load_compiled() if used == "compiled" else None
    if compiled is None and engine == "compiled":
        raise RuntimeError("the compiled CPU engine needs Numba, which does not import here")
    if compiled is not None:

        def kernel(states: np.ndarray, out: np.ndarray) -> None:
            compiled.KERNELS[prng_type](states, hist, np.int64(mod), np.int64(skip), out)

        default_chunk = CHUNK_SEEDS["compiled"]
    else:
        def kernel(states: np.ndarray, out: np.ndarray) -> None:
            out[:] = vectorized.KERNELS[prng_type](states, hist, mod, skip)

        default_chunk = CHUNK_SEEDS[
            "vectorized_mt19937" if prng_type == "mt19937" else "vectorized"]
    step = chunk or default_chunk
    out = np.empty(seeds.shape[0], dtype=np.int32)
    for start in range(0, seeds.shape[0], step):
        kernel(initial_states(prng_type, seeds[start:start + step]), out[start:start + step])
    return out
