"""What every backend shares: a seed's starting state, and exact fast division."""

from __future__ import annotations

import numpy as np

from scoring.prng import JAVA_MASK, JAVA_MULTIPLIER, MINSTD_MODULUS


def initial_states(prng_type: str, seeds: np.ndarray) -> np.ndarray:
    """Per-seed starting state as uint64 (the constructor's work, done once)."""
    if prng_type == "java_lcg":
        return ((seeds.astype(np.int64) ^ JAVA_MULTIPLIER) & JAVA_MASK).astype(np.uint64)
    states = seeds.astype(np.uint64)
    if prng_type == "minstd":
        states = states % np.uint64(MINSTD_MODULUS)
        states[states == 0] = 1
    return states


def java_magic(mod: int) -> tuple[int, int]:
    """(m, shift) with (u * m) >> shift == u // mod for every 0 <= u < 2^31.

    Granlund-Montgomery: m = ceil(2^(31+l) / mod) with l = ceil(log2 mod); the
    product u * m stays below 2^63, so it fits a signed 64-bit integer.
    """
    shift = 31 + max(0, (mod - 1).bit_length())
    return -(-(1 << shift) // mod), shift
