"""Choosing where seeds are scored: ``cupy`` (GPU), ``numpy`` (CPU), or ``auto``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from scoring import cpu, gpu

BACKEND_CHOICES = ("auto", "cupy", "numpy")


class MatchesFn(Protocol):
    def __call__(self, prng_type: str, seeds: np.ndarray, history: np.ndarray, mod: int,
                 skip: int = 0) -> np.ndarray: ...


@dataclass(frozen=True)
class Backend:
    """A scoring backend: its name, why it was chosen, and its matches function."""

    name: str
    detail: str
    matches: MatchesFn


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run here (e.g. cupy without a GPU)."""


def select_backend(choice: str = "auto") -> Backend:
    """``auto`` takes the GPU when CuPy sees a usable one, else the CPU."""
    if choice not in BACKEND_CHOICES:
        raise BackendUnavailable(f"unknown backend {choice!r}; choose {', '.join(BACKEND_CHOICES)}")
    compiled = ("Numba-compiled loops for large chunks" if importlib.util.find_spec("numba")
                else "no compiled loops: Numba is not installed")
    cpu_backend = Backend("numpy", f"CPU: NumPy, {compiled}", cpu.matches)
    if choice == "numpy":
        return cpu_backend
    try:
        detail = gpu.probe()
    except gpu.GpuUnavailable as err:
        if choice == "cupy":
            raise BackendUnavailable(f"--backend cupy: {err}") from None
        return Backend(cpu_backend.name, f"{cpu_backend.detail}; no GPU: {err}", cpu.matches)
    return Backend("cupy", detail, gpu.matches)


def best_engine() -> str:
    """The fastest engine this machine can score with, and why not a faster one: one line
    (``coordinator cluster status`` shows it per node)."""
    try:
        return f"cupy ({gpu.probe()})"
    except gpu.GpuUnavailable as err:
        no_gpu = f"no GPU: {err}"
    try:
        import numba
    except ImportError:
        return f"numpy (Numba not installed; {no_gpu})"
    return f"numba {numba.__version__} ({no_gpu})"
