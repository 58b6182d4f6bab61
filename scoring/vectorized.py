"""NumPy vectorised over seeds: every step of the PRNG is one array operation.

No compile and no import cost, so it is the CPU engine for small chunks; it
also needs nothing beyond NumPy. Each function takes the initial states of a
chunk of seeds (``scoring.states.initial_states``) and returns the matches.
All arithmetic is unsigned and wraps exactly like the references.
"""

from __future__ import annotations

import numpy as np

from scoring.prng import JAVA_MASK, JAVA_MULTIPLIER, MINSTD_MODULUS
from scoring.states import java_magic

J_MULT = np.uint64(JAVA_MULTIPLIER)
J_INC = np.uint64(0xB)
J_MASK = np.uint64(JAVA_MASK)
MT_N = 624


def java_lcg(states: np.ndarray, history: np.ndarray, mod: int, skip: int) -> np.ndarray:
    state = states.astype(np.uint64, copy=True)
    matches = np.zeros(state.shape[0], dtype=np.int32)
    magic, shift = java_magic(mod)
    pow2 = mod & (mod - 1) == 0

    def next31(s: np.ndarray) -> np.ndarray:
        np.multiply(s, J_MULT, out=s)
        np.add(s, J_INC, out=s)
        np.bitwise_and(s, J_MASK, out=s)
        return (s >> np.uint64(17)).astype(np.int64)

    for i in range(skip + history.shape[0]):
        u = next31(state)
        if pow2:
            r = (mod * u) >> 31
        else:
            r = u - ((u * magic) >> shift) * mod
            redraw = np.flatnonzero(u - r + (mod - 1) >= 1 << 31)  # Java's rejection test
            while redraw.size:
                sub = state[redraw]
                u_new = next31(sub)
                state[redraw] = sub
                r_new = u_new - ((u_new * magic) >> shift) * mod
                r[redraw] = r_new
                redraw = redraw[u_new - r_new + (mod - 1) >= 1 << 31]
        if i >= skip:
            matches += r == history[i - skip]
    return matches


def mt19937(states: np.ndarray, history: np.ndarray, mod: int, skip: int) -> np.ndarray:
    n = states.shape[0]
    mt = np.empty((MT_N, n), dtype=np.uint32)  # row k holds word k of every seed's state
    mt[0] = states.astype(np.uint32)
    for k in range(1, MT_N):
        prev = mt[k - 1]
        mt[k] = np.uint32(1812433253) * (prev ^ (prev >> np.uint32(30))) + np.uint32(k)
    matches = np.zeros(n, dtype=np.int32)
    index = MT_N
    for i in range(skip + history.shape[0]):
        if index == MT_N:
            for k in range(MT_N):  # the twist, one word of every seed at a time
                y = (mt[k] & np.uint32(0x80000000)) | (mt[(k + 1) % MT_N] & np.uint32(0x7FFFFFFF))
                mt[k] = mt[(k + 397) % MT_N] ^ (y >> np.uint32(1)) ^ (
                    (y & np.uint32(1)) * np.uint32(0x9908B0DF))
            index = 0
        y = mt[index].copy()
        index += 1
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        if i >= skip:
            matches += (y.astype(np.uint64) % np.uint64(mod)) == history[i - skip]
    return matches


def minstd(states: np.ndarray, history: np.ndarray, mod: int, skip: int) -> np.ndarray:
    x = states.astype(np.int64, copy=True)
    matches = np.zeros(x.shape[0], dtype=np.int32)
    for i in range(skip + history.shape[0]):
        x = x * 48271 % MINSTD_MODULUS
        if i >= skip:
            matches += x % mod == history[i - skip]
    return matches


def xorshift32(states: np.ndarray, history: np.ndarray, mod: int, skip: int) -> np.ndarray:
    x = states.astype(np.uint32, copy=True)
    matches = np.zeros(x.shape[0], dtype=np.int32)
    for i in range(skip + history.shape[0]):
        x ^= x << np.uint32(13)
        x ^= x >> np.uint32(17)
        x ^= x << np.uint32(5)
        if i >= skip:
            matches += (x.astype(np.uint64) % np.uint64(mod)) == history[i - skip]
    return matches


KERNELS = {"java_lcg": java_lcg, "mt19937": mt19937, "minstd": minstd,
           "xorshift32": xorshift32}
