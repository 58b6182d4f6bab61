"""GPU backend: CuPy raw kernels, one thread per seed.

The history lives in shared memory (every thread of a warp reads the same
draw at the same step, a broadcast), or in global memory through the read-only
cache when it is longer than ``SHARED_HISTORY_MAX``. ``mod`` and ``skip`` are
compile-time constants, so the modulo becomes a multiply and a shift; each
(prng, mod, skip) compiles once per process and is cached by CuPy on disk.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

# Draws kept in shared memory (48 KiB of uint32, the default per-block limit); the rest
# is read from global memory.
SHARED_HISTORY_MAX = 12 * 1024
THREADS_PER_BLOCK = 256
# Seeds per launch: bounds device memory (8 + 4 bytes per seed) whatever the input.
CHUNK_SEEDS = 1 << 26

KERNEL_SOURCE = r"""
#ifndef DECLARE_SHARED_HISTORY
#define DECLARE_SHARED_HISTORY extern __shared__ u32 hist[];
#endif
typedef unsigned long long u64;
typedef unsigned int u32;

__device__ __forceinline__ u32 java_next31(u64 &s) {
    s = (s * 0x5DEECE66DULL + 0xBULL) & ((1ULL << 48) - 1);
    return (u32)(s >> 17);
}

__device__ __forceinline__ u32 java_next_int(u64 &s) {
    u32 u = java_next31(s);
    if ((MOD & (MOD - 1)) == 0) {
        return (u32)(((u64)MOD * u) >> 31);
    }
    u32 r = u % MOD;
    while (u - r + (MOD - 1) >= 0x80000000u) {  // Java: u - r + m < 0 as int
        u = java_next31(s);
        r = u % MOD;
    }
    return r;
}

__device__ __forceinline__ u32 draw(u64 &s) {
#if PRNG == 0
    return java_next_int(s);
#elif PRNG == 2
    s = (s * 48271ULL) % 2147483647ULL;
    return (u32)(s % (u64)MOD);
#elif PRNG == 3
    u32 x = (u32)s;
    x ^= x << 13; x ^= x >> 17; x ^= x << 5;
    s = x;
    return (u32)((u64)x % (u64)MOD);
#else
    return 0;  // mt19937 keeps its own state array: see score()
#endif
}

// The constructor's work, per thread: seeds arrive as raw 64-bit values.
__device__ __forceinline__ u64 initial_state(u64 seed) {
#if PRNG == 0
    return (seed ^ 0x5DEECE66DULL) & ((1ULL << 48) - 1);  // java.util.Random(seed)
#elif PRNG == 2
    u64 s = seed % 2147483647ULL;  // linear_congruential_engine::seed
    return s ? s : 1;
#else
    return seed & 0xffffffffULL;
#endif
}

extern "C" __global__ void score(const u64* __restrict__ seeds,
                                 const u32* __restrict__ history, int n_draws, int n_shared,
                                 int* __restrict__ out, long long n_seeds) {
    // Dynamic shared memory sized to the history: short histories keep occupancy high.
    DECLARE_SHARED_HISTORY
    for (int i = threadIdx.x; i < n_shared; i += blockDim.x) hist[i] = history[i];
    __syncthreads();
    long long seed = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (seed >= n_seeds) return;
    u64 s = initial_state(seeds[seed]);
#if PRNG == 1
    // std::mt19937: per-thread 624-word state in local memory.
    u32 mt[624];
    mt[0] = (u32)s;
    for (int i = 1; i < 624; i++) mt[i] = 1812433253u * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i;
    int index = 624;
    int matches = 0;
    for (int i = 0; i < SKIP + n_draws; i++) {
        if (index == 624) {
            for (int k = 0; k < 624; k++) {
                u32 y = (mt[k] & 0x80000000u) | (mt[(k + 1) % 624] & 0x7fffffffu);
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
            }
            index = 0;
        }
        u32 y = mt[index++];
        y ^= y >> 11; y ^= (y << 7) & 0x9d2c5680u; y ^= (y << 15) & 0xefc60000u; y ^= y >> 18;
        u32 r = (u32)((u64)y % (u64)MOD);
        if (i >= SKIP) {
            u32 h = (i - SKIP < n_shared) ? hist[i - SKIP] : __ldg(&history[i - SKIP]);
            matches += (r == h);
        }
    }
    out[seed] = matches;
#else
    for (int i = 0; i < SKIP; i++) draw(s);
    int matches = 0;
    for (int i = 0; i < n_draws; i++) {
        u32 h = (i < n_shared) ? hist[i] : __ldg(&history[i]);
        matches += (draw(s) == h);
    }
    out[seed] = matches;
#endif
}
"""

PRNG_CODES = {"java_lcg": 0, "mt19937": 1, "minstd": 2, "xorshift32": 3}


class GpuUnavailable(RuntimeError):
    """CuPy is missing or sees no usable GPU."""


def probe() -> str:
    """A short description of the GPU CuPy would use; raises ``GpuUnavailable``."""
    try:
        import cupy
    except ImportError as err:
        # Name what is missing once: CuPy itself, or a module CuPy needs.
        if err.name in (None, "cupy"):
            raise GpuUnavailable("cupy is not installed") from None
        raise GpuUnavailable(f"cupy cannot be imported: it needs {err.name}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            raise GpuUnavailable("no CUDA device visible")
        props = cupy.cuda.runtime.getDeviceProperties(0)
        cupy.zeros(1, dtype=cupy.int32).sum().item()  # the device really works
    except GpuUnavailable:
        raise
    except Exception as err:  # CUDA errors come in several types across versions
        raise GpuUnavailable(f"no usable GPU: {err}") from None
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name}, device 0 of {count}"


@cache
def _kernel(prng_type: str, mod: int, skip: int) -> Any:
    import cupy

    options = (
        f"-DPRNG={PRNG_CODES[prng_type]}",
        f"-DMOD={mod}u" if mod < (1 << 32) else f"-DMOD={mod}ULL",
        f"-DSKIP={skip}",
        "-std=c++14",
    )
    return cupy.RawModule(code=KERNEL_SOURCE, options=options).get_function("score")


def matches(
    prng_type: str, seeds: np.ndarray, history: np.ndarray, mod: int, skip: int = 0,
    chunk: int = CHUNK_SEEDS,
) -> np.ndarray:
    """Matches per seed (int32), computed on the GPU, chunk by chunk."""
    import cupy

    raw = np.ascontiguousarray(seeds).view(np.uint64)  # int64 Java longs keep their bits
    hist = cupy.asarray(np.asarray(history, dtype=np.int64).astype(np.uint32))  # draws < 2^32
    out = np.empty(raw.shape[0], dtype=np.int32)
    for start in range(0, raw.shape[0], chunk):
        on_device = cupy.asarray(raw[start:start + chunk])
        out[start:start + on_device.shape[0]] = device_matches(
            prng_type, on_device, hist, mod, skip).get()
    return out


def device_matches(prng_type: str, seeds: Any, history: Any, mod: int, skip: int = 0) -> Any:
    """The kernel alone, on arrays already on the device (uint64 seeds, uint32 history)."""
    import cupy

    kernel = _kernel(prng_type, int(mod), int(skip))
    n = seeds.shape[0]
    result = cupy.empty(n, dtype=cupy.int32)
    blocks = (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    n_shared = min(history.shape[0], SHARED_HISTORY_MAX)
    kernel((blocks,), (THREADS_PER_BLOCK,),
           (seeds, history, np.int32(history.shape[0]), np.int32(n_shared), result, np.int64(n)),
           shared_mem=n_shared * 4)
    return result
