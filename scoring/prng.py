"""The four PRNGs, as plain Python: the references every backend is checked against.

Each generator reproduces a well-known implementation exactly:

* ``java_lcg``: ``new java.util.Random(seed).nextInt(mod)``, repeated: the
  constructor's scrambling, the power-of-two path and the rejection loop.
* ``mt19937``: C++ ``std::mt19937(seed)`` raw 32-bit outputs, ``% mod``.
* ``minstd``: C++ ``std::minstd_rand(seed)`` outputs, ``% mod``.
* ``xorshift32``: Marsaglia's 13/17/5 xorshift; output is the new state, ``% mod``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

JAVA_MULTIPLIER = 0x5DEECE66D
JAVA_INCREMENT = 0xB
JAVA_MASK = (1 << 48) - 1
MINSTD_MULTIPLIER = 48271
MINSTD_MODULUS = 2147483647  # 2^31 - 1
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class PrngInfo:
    """What a PRNG accepts: seed range (inclusive) and the largest mod."""

    name: str
    seed_min: int
    seed_max: int
    mod_max: int
    description: str


PRNGS: dict[str, PrngInfo] = {
    "java_lcg": PrngInfo("java_lcg", -(1 << 63), (1 << 63) - 1, (1 << 31) - 1,
                         "java.util.Random(seed).nextInt(mod); seeds are Java longs"),
    "mt19937": PrngInfo("mt19937", 0, MASK32, 1 << 32,
                        "std::mt19937(seed) raw outputs % mod; seeds are uint32"),
    "minstd": PrngInfo("minstd", 0, MASK32, 1 << 31,
                       "std::minstd_rand(seed) outputs % mod; seeds are uint32"),
    "xorshift32": PrngInfo("xorshift32", 1, MASK32, 1 << 32,
                           "xorshift 13/17/5 on 32 bits, output = new state % mod; seed != 0"),
}
PRNG_TYPES = tuple(PRNGS)


def java_scramble(seed: int) -> int:
    """The initial 48-bit state of ``new java.util.Random(seed)``."""
    return (seed ^ JAVA_MULTIPLIER) & JAVA_MASK


def java_next_int(state: int, bound: int) -> tuple[int, int]:
    """One ``nextInt(bound)``: returns (new state, value)."""

    def next31(s: int) -> tuple[int, int]:
        s = (s * JAVA_MULTIPLIER + JAVA_INCREMENT) & JAVA_MASK
        return s, s >> 17

    state, r = next31(state)
    m = bound - 1
    if bound & m == 0:  # power of two: take the high bits
        return state, (bound * r) >> 31
    u = r
    r = u % bound
    while u - r + m >= 1 << 31:  # Java's `u - r + m < 0` int overflow: reject and redraw
        state, u = next31(state)
        r = u % bound
    return state, r


def java_lcg(seed: int, mod: int) -> Iterator[int]:
    state = java_scramble(seed)
    while True:
        state, value = java_next_int(state, mod)
        yield value


def mt19937(seed: int, mod: int) -> Iterator[int]:
    mt = [0] * 624
    mt[0] = seed & MASK32
    for i in range(1, 624):
        mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & MASK32
    index = 624
    while True:
        if index == 624:
            for i in range(624):
                y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
                mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            index = 0
        y = mt[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        yield y % mod


def minstd_seed(seed: int) -> int:
    """``linear_congruential_engine::seed``: s mod m, and 1 where that is 0."""
    state = seed % MINSTD_MODULUS
    return state if state else 1


def minstd(seed: int, mod: int) -> Iterator[int]:
    state = minstd_seed(seed)
    while True:
        state = state * MINSTD_MULTIPLIER % MINSTD_MODULUS
        yield state % mod


def xorshift32(seed: int, mod: int) -> Iterator[int]:
    if seed & MASK32 == 0:
        raise ValueError("xorshift32 seed must not be 0 (the state would stay 0)")
    state = seed & MASK32
    while True:
        state ^= (state << 13) & MASK32
        state ^= state >> 17
        state ^= (state << 5) & MASK32
        yield state % mod


GENERATORS = {"java_lcg": java_lcg, "mt19937": mt19937, "minstd": minstd,
              "xorshift32": xorshift32}


def reference_draws(prng_type: str, seed: int, mod: int, count: int, skip: int = 0) -> list[int]:
    """``count`` draws of ``prng_type`` from ``seed``, after discarding ``skip``."""
    return list(islice(GENERATORS[prng_type](seed, mod), skip, skip + count))


def reference_matches(
    prng_type: str, seed: int, history: list[int], mod: int, skip: int = 0
) -> int:
    """Positions where the seed's draws equal the history: the plain per-seed loop."""
    draws = reference_draws(prng_type, seed, mod, len(history), skip)
    return sum(1 for a, b in zip(draws, history, strict=True) if a == b)
