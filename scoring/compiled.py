"""Numba-compiled loops over NumPy arrays, parallel over seeds: the fast CPU engine.

One compiled loop per PRNG, each ``(states, history, mod, skip, out)``:
``states`` are the per-seed initial states (``scoring.states``), ``out[i]``
receives the number of matches of seed i.

Modulo by a run-time ``mod`` avoids the integer division that dominates the
plain loop: java_lcg's 31-bit values use an exact multiply-and-shift
(``java_magic``), the 32-bit PRNGs a double-precision reciprocal with one
correction step (exact below 2^33).

Loading the compiled code costs about 0.7 s per process (it is cached
on disk after the first compile), so ``scoring.cpu`` uses it only for large
chunks.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from scoring.prng import JAVA_MASK, JAVA_MULTIPLIER
from scoring.states import java_magic

# True once every loop's machine code is loaded in this process (``scoring.warm_engines``):
# then it costs nothing more, and ``scoring.cpu`` uses it whatever the chunk's size.
LOADED = False
# Seeds per parallel block in mt19937, which needs a 624-word scratch state.
MT_BLOCK = 256

U64 = np.uint64
J_MULT = np.uint64(JAVA_MULTIPLIER)
J_INC = np.uint64(0xB)
J_MASK = np.uint64(JAVA_MASK)
J_SHIFT = np.uint64(17)
M32 = np.uint64(0xFFFFFFFF)
TWO31 = np.int64(1 << 31)


@nb.njit(inline="always")
def _mod(x: int, d: int, inv: float) -> int:
    # floor(x / d) from a double reciprocal is off by at most one for x < 2^33.
    q = np.int64(np.float64(x) * inv)
    r = x - q * d
    if r < 0:
        r += d
    elif r >= d:
        r -= d
    return r


@nb.njit(inline="always")
def _java_next31(state: np.uint64) -> tuple[np.uint64, int]:
    state = (state * J_MULT + J_INC) & J_MASK
    return state, np.int64(state >> J_SHIFT)


@nb.njit(inline="always")
def _java_next_int(state: np.uint64, mod: int, magic: int, shift: int,
                   pow2: bool) -> tuple[np.uint64, int]:
    state, u = _java_next31(state)
    if pow2:
        return state, (mod * u) >> 31
    r = u - ((u * magic) >> shift) * mod
    while u - r + (mod - 1) >= TWO31:  # Java's int overflow test: reject, draw again
        state, u = _java_next31(state)
        r = u - ((u * magic) >> shift) * mod
    return state, r


@nb.njit(parallel=True, cache=True)
def _java_lcg(
    states: np.ndarray, history: np.ndarray, mod: int, skip: int, out: np.ndarray,
    magic: int, shift: int,
) -> None:
    pow2 = (mod & (mod - 1)) == 0
    for s in nb.prange(states.shape[0]):
        state = states[s]
        for _ in range(skip):
            state, r = _java_next_int(state, mod, magic, shift, pow2)
        matches = 0
        for i in range(history.shape[0]):
            state, r = _java_next_int(state, mod, magic, shift, pow2)
            matches += r == history[i]
        out[s] = matches


def java_lcg_matches(
    states: np.ndarray, history: np.ndarray, mod: int, skip: int, out: np.ndarray
) -> None:
    magic, shift = java_magic(int(mod))
    _java_lcg(states, history, mod, skip, out, np.int64(magic), np.int64(shift))


@nb.njit(inline="always")
def _mt_twist(mt: np.ndarray) -> None:
    for i in range(624):
        y = (mt[i] & U64(0x80000000)) | (mt[(i + 1) % 624] & U64(0x7FFFFFFF))
        v = mt[(i + 397) % 624] ^ (y >> U64(1))
        if y & U64(1):
            v ^= U64(0x9908B0DF)
        mt[i] = v


@nb.njit(parallel=True, cache=True)
def mt19937_matches(
    states: np.ndarray, history: np.ndarray, mod: int, skip: int, out: np.ndarray
) -> None:
    inv = 1.0 / mod
    n = states.shape[0]
    total = skip + history.shape[0]
    for block in nb.prange((n + MT_BLOCK - 1) // MT_BLOCK):
        mt = np.empty(624, np.uint64)
        for s in range(block * MT_BLOCK, min(n, (block + 1) * MT_BLOCK)):
            mt[0] = states[s] & M32
            for i in range(1, 624):
                prev = mt[i - 1]
                mt[i] = (U64(1812433253) * (prev ^ (prev >> U64(30))) + U64(i)) & M32
            index = 624
            matches = 0
            for i in range(total):
                if index == 624:
                    _mt_twist(mt)
                    index = 0
                y = mt[index]
                index += 1
                y ^= y >> U64(11)
                y ^= (y << U64(7)) & U64(0x9D2C5680)
                y ^= (y << U64(15)) & U64(0xEFC60000)
                y ^= y >> U64(18)
                r = _mod(np.int64(y), mod, inv)
                if i >= skip:
                    matches += r == history[i - skip]
            out[s] = matches


@nb.njit(inline="always")
def _minstd_step(x: int) -> int:
    return x * 48271 % 2147483647


@nb.njit(inline="always")
def _xorshift_step(x: np.uint64) -> np.uint64:
    x ^= (x << U64(13)) & M32
    x ^= x >> U64(17)
    return x ^ ((x << U64(5)) & M32)


@nb.njit(parallel=True, cache=True)
def minstd_matches(
    states: np.ndarray, history: np.ndarray, mod: int, skip: int, out: np.ndarray
) -> None:
    inv = 1.0 / mod
    for s in nb.prange(states.shape[0]):
        x = np.int64(states[s])
        for _ in range(skip):
            x = _minstd_step(x)
        matches = 0
        for i in range(history.shape[0]):
            x = _minstd_step(x)
            matches += _mod(x, mod, inv) == history[i]
        out[s] = matches


@nb.njit(parallel=True, cache=True)
def xorshift32_matches(
    states: np.ndarray, history: np.ndarray, mod: int, skip: int, out: np.ndarray
) -> None:
    inv = 1.0 / mod
    for s in nb.prange(states.shape[0]):
        x = states[s] & M32
        for _ in range(skip):
            x = _xorshift_step(x)
        matches = 0
        for i in range(history.shape[0]):
            x = _xorshift_step(x)
            matches += _mod(np.int64(x), mod, inv) == history[i]
        out[s] = matches


KERNELS = {
    "java_lcg": java_lcg_matches,
    "mt19937": mt19937_matches,
    "minstd": minstd_matches,
    "xorshift32": xorshift32_matches,
}

# The compiled loops themselves (java_lcg's takes its magic numbers as two more int64s).
PARALLEL_LOOPS = (_java_lcg, mt19937_matches, minstd_matches, xorshift32_matches)


def load_all() -> None:
    """Load every loop's machine code for the types ``scoring.cpu`` calls it with, from
    Numba's on-disk cache (compiled there the first time): nothing runs, so no thread pool
    starts, and a process forked after this scores compiled from its first seed."""
    global LOADED
    arrays = (nb.uint64[::1], nb.int64[::1], nb.int64, nb.int64, nb.int32[::1])
    for loop in PARALLEL_LOOPS:
        extra = loop.py_func.__code__.co_argcount - len(arrays)
        loop.compile((*arrays, *([nb.int64] * extra)))
    LOADED = True
