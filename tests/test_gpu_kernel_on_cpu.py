"""The CUDA kernel's source, compiled as plain C++ and run on the CPU.

No GPU is needed: CUDA's few keywords are defined away and every "thread"
runs in turn (one thread per block, so each thread loads the shared history
itself). This checks the kernel's arithmetic (every PRNG, the compile-time
modulo, skip, the shared/global history split) against the CPU backend;
the GPU parity test in test_scoring.py covers the real device.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scoring import cpu
from scoring.gpu import KERNEL_SOURCE, PRNG_CODES
from scoring.prng import PRNGS, reference_draws
from tests.test_scoring import REDRAW_SEED
from tests.toolchains import require

PRELUDE = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define DECLARE_SHARED_HISTORY static u32 hist[1 << 16];
struct dim { unsigned int x; };
static dim threadIdx = {0}, blockIdx = {0}, blockDim = {1};
static inline void __syncthreads() {}
template <typename T> static inline T __ldg(const T* p) { return *p; }
"""

HARNESS = r"""
int main(int argc, char** argv) {
    long long n = atoll(argv[1]); int k = atoi(argv[2]); int n_shared = atoi(argv[6]);
    std::vector<u64> states(n); std::vector<u32> hist(k); std::vector<int> out(n);
    FILE* f = fopen(argv[3], "rb"); fread(states.data(), 8, n, f); fclose(f);
    f = fopen(argv[4], "rb"); fread(hist.data(), 4, k, f); fclose(f);
    for (long long b = 0; b < n; b++) {
        blockIdx.x = (unsigned int)b;
        score(states.data(), hist.data(), k, n_shared, out.data(), n);
    }
    f = fopen(argv[5], "wb"); fwrite(out.data(), 4, n, f); fclose(f);
    return 0;
}
"""


@pytest.fixture(scope="module")
def compiler() -> str:
    require("g++", purpose="compiling the CUDA kernel's source as C++")
    return str(shutil.which("g++"))


def run_kernel(compiler: str, work: Path, prng: str, seeds: np.ndarray, history: np.ndarray,
               mod: int, skip: int, shared_n: int) -> np.ndarray:
    source = work / "kernel.cpp"
    source.write_text(PRELUDE + KERNEL_SOURCE + HARNESS)
    binary = work / f"kernel_{prng}_{mod}_{skip}_{shared_n}"
    mod_literal = f"{mod}u" if mod < (1 << 32) else f"{mod}ULL"
    subprocess.run([compiler, "-O1", "-w", f"-DPRNG={PRNG_CODES[prng]}", f"-DMOD={mod_literal}",
                    f"-DSKIP={skip}", "-o", str(binary), str(source)],
                   check=True, timeout=120)
    seeds.view(np.uint64).tofile(work / "states.bin")  # raw seeds, as the GPU receives them
    history.astype(np.uint32).tofile(work / "hist.bin")
    n_shared = min(shared_n, len(history))
    subprocess.run([str(binary), str(len(seeds)), str(len(history)), str(work / "states.bin"),
                    str(work / "hist.bin"), str(work / "out.bin"), str(n_shared)],
                   check=True, timeout=120)
    return np.fromfile(work / "out.bin", dtype=np.int32)


CASES = [
    ("java_lcg", 1000, 0, 4096), ("java_lcg", 16, 3, 4096), ("java_lcg", 2**31 - 1, 1, 8),
    # A bound where Java's nextInt rejects about 30% of draws: the redraw path runs.
    ("java_lcg", 1_500_000_000, 2, 4096), ("java_lcg", 715_827_883, 0, 8),
    ("mt19937", 1000, 0, 4096), ("mt19937", 2**32, 630, 8), ("minstd", 7, 2, 4096),
    ("minstd", 2**31, 0, 8), ("xorshift32", 1000, 5, 4096), ("xorshift32", 2**32, 0, 8),
]


@pytest.mark.parametrize(("prng", "mod", "skip", "shared_n"), CASES)
def test_cuda_kernel_source_matches_cpu_backend(compiler: str, tmp_path: Path, prng: str,
                                                mod: int, skip: int, shared_n: int) -> None:
    rng = np.random.default_rng(mod + skip)
    info = PRNGS[prng]
    low, high = max(info.seed_min, -(2**62)), min(info.seed_max, 2**62)
    seeds = rng.integers(max(low, 1), high, size=300, dtype=np.int64).tolist()
    # Edge seeds: negative Java longs; minstd seeds that are multiples of 2^31 - 1.
    # REDRAW_SEED: its first draw is the one value nextInt rejects at bound 2**31 - 1.
    seeds += ([-1, -(2**63), 2**63 - 1, -123456789, REDRAW_SEED] if prng == "java_lcg"
              else [2**32 - 1, 2147483647, 4294967294, 1])
    seeds = np.array(seeds, dtype=np.int64 if info.seed_min < 0 else np.uint64)
    draws = reference_draws(prng, int(seeds[11]), mod, 40, skip)
    history = np.array([d if i % 4 else int(rng.integers(0, mod)) for i, d in enumerate(draws)],
                       dtype=np.int64)
    got = run_kernel(compiler, tmp_path, prng, seeds, history, mod, skip, shared_n)
    want = cpu.matches(prng, seeds, history, mod, skip)
    assert got.tolist() == want.tolist()
    assert got[11] >= 30
