"""Scoring throughput: seed-draws per second per backend, against two baselines.

    python benchmarks/bench_scoring.py [--seeds N] [--draws K] [--prng-type java_lcg]
                                       [--mod 1000] [--python-seeds N] [--gpu-seeds N]

Baselines, measured in the same run on the same seeds and history:
  * a plain per-seed Python loop (``scoring.prng.reference_matches``) on a subset;
  * a small C loop (java_lcg only), compiled now with the machine's C compiler
    (``cc -O2``), single-threaded, timed inside the C program.

Every backend's matches are checked equal to the C loop's (or to the Python
loop's on the subset) before its figure is printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scoring import cpu  # noqa: E402
from scoring.prng import PRNGS, reference_matches  # noqa: E402

C_LOOP = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    long n = atol(argv[3]), k = atol(argv[4]);
    int32_t bound = atoi(argv[5]);
    int64_t *seeds = malloc(n * 8); int32_t *hist = malloc(k * 4); int32_t *out = malloc(n * 4);
    FILE *f = fopen(argv[1], "rb"); fread(seeds, 8, n, f); fclose(f);
    f = fopen(argv[2], "rb"); fread(hist, 4, k, f); fclose(f);
    const uint64_t A = 0x5DEECE66DULL, MASK = (1ULL << 48) - 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long j = 0; j < n; j++) {
        uint64_t s = ((uint64_t)seeds[j] ^ A) & MASK;
        int32_t m = 0;
        for (long i = 0; i < k; i++) {
            s = (s * A + 0xB) & MASK;
            int32_t r = (int32_t)(s >> 17);
            if ((bound & -bound) == bound) {
                r = (int32_t)(((int64_t)bound * r) >> 31);
            } else {
                int32_t u = r;
                while ((uint32_t)(u - (r = u % bound)) + (uint32_t)(bound - 1) >= 0x80000000u) {
                    s = (s * A + 0xB) & MASK;
                    u = (int32_t)(s >> 17);
                }
            }
            m += (r == hist[i]);
        }
        out[j] = m;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    f = fopen(argv[6], "wb"); fwrite(out, 4, n, f); fclose(f);
    printf("%.6f\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
"""


def c_loop(
    seeds: np.ndarray, history: np.ndarray, mod: int, work: Path
) -> tuple[float, np.ndarray]:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler")
    (work / "loop.c").write_text(C_LOOP)
    subprocess.run([compiler, "-O2", "-o", str(work / "loop"), str(work / "loop.c")], check=True)
    seeds.astype(np.int64).tofile(work / "seeds.bin")
    history.astype(np.int32).tofile(work / "hist.bin")
    out = subprocess.run([str(work / "loop"), str(work / "seeds.bin"), str(work / "hist.bin"),
                          str(len(seeds)), str(len(history)), str(mod), str(work / "out.bin")],
                         check=True, capture_output=True, text=True)
    return float(out.stdout), np.fromfile(work / "out.bin", dtype=np.int32)


def gpu_rows(args: argparse.Namespace, seeds: np.ndarray, history: np.ndarray,
             cpu_matches: np.ndarray) -> list[tuple[str, int, float]]:
    """The CuPy backend on --gpu-seeds seeds: kernel alone, and end to end from host arrays."""
    import cupy

    from scoring import gpu

    detail = gpu.probe()
    # The first len(seeds) GPU seeds are the CPU rows' seeds, to check the matches.
    extra = np.random.default_rng(2).integers(1, 2**62, size=max(0, args.gpu_seeds - len(seeds)))
    big = np.concatenate([seeds, extra.astype(seeds.dtype)])
    gpu.matches(args.prng_type, big[:1024], history, args.mod)  # compile once
    t_end, on_gpu = timed(gpu.matches, args.prng_type, big, history, args.mod)
    assert np.array_equal(on_gpu[: len(seeds)], cpu_matches), "GPU backend != CPU backend"
    dev_seeds = cupy.asarray(big.view(np.uint64))
    dev_hist = cupy.asarray(history.astype(np.uint32))
    gpu.device_matches(args.prng_type, dev_seeds, dev_hist, args.mod)
    cupy.cuda.Device().synchronize()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        result = gpu.device_matches(args.prng_type, dev_seeds, dev_hist, args.mod)
        cupy.cuda.Device().synchronize()
        runs.append(time.perf_counter() - start)
    assert np.array_equal(result.get(), on_gpu), "GPU kernel differs between runs"
    return [(f"cupy kernel only, best of 3 ({detail})", len(big), min(runs)),
            ("cupy end to end (host arrays in and out)", len(big), t_end)]


def timed(fn, *args) -> tuple[float, np.ndarray]:  # noqa: ANN001
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4_000_000)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--prng-type", default="java_lcg", choices=list(PRNGS))
    parser.add_argument("--mod", type=int, default=1000)
    parser.add_argument("--python-seeds", type=int, default=3000,
                        help="seeds for the slow pure-Python baseline")
    parser.add_argument("--gpu-seeds", type=int, default=100_000_000,
                        help="seeds for the GPU rows (default: 10^8)")
    args = parser.parse_args()

    rng = np.random.default_rng(1)
    info = PRNGS[args.prng_type]
    low, high = max(info.seed_min, -(2**62)), min(info.seed_max, 2**62)
    seeds = rng.integers(max(low, 1), high, size=args.seeds, dtype=np.int64)
    if info.seed_min >= 0:
        seeds = seeds.astype(np.uint64)
    history = rng.integers(0, args.mod, size=args.draws, dtype=np.int64)
    work_per_seed = args.draws
    rows: list[tuple[str, int, float]] = []

    # Baseline 1: the plain per-seed Python loop, on a subset.
    subset = seeds[: args.python_seeds]
    hist_list = history.tolist()
    t, py_matches = timed(lambda: np.array([reference_matches(args.prng_type, int(s), hist_list,
                                                              args.mod) for s in subset]))
    rows.append(("python loop (1 core)", len(subset), t))

    # The CPU backend's two engines; the compiled one loads (or compiles) once before timing.
    cpu.matches(args.prng_type, seeds[:64], history, args.mod, engine="compiled")
    import numba

    cores = numba.config.NUMBA_NUM_THREADS
    tv, vector = timed(lambda: cpu.matches(args.prng_type, seeds, history, args.mod,
                                           engine="vectorized"))
    numba.set_num_threads(1)
    t1, single = timed(lambda: cpu.matches(args.prng_type, seeds, history, args.mod,
                                           engine="compiled"))
    numba.set_num_threads(cores)
    tn, multi = timed(lambda: cpu.matches(args.prng_type, seeds, history, args.mod,
                                          engine="compiled"))
    assert np.array_equal(single, multi) and np.array_equal(single, vector)
    assert np.array_equal(single[: len(subset)], py_matches), "CPU backend != Python reference"

    c_time = None
    if args.prng_type == "java_lcg":
        with tempfile.TemporaryDirectory() as tmp:
            c_time, c_matches = c_loop(seeds, history, args.mod, Path(tmp))
        assert np.array_equal(c_matches, single), "CPU backend != C loop"
        rows.append(("C loop, cc -O2 (1 core)", len(seeds), c_time))
    rows.append(("numpy backend, vectorised engine (1 core)", len(seeds), tv))
    rows.append(("numpy backend, compiled engine, 1 thread", len(seeds), t1))
    rows.append((f"numpy backend, compiled engine, {cores} threads", len(seeds), tn))

    try:
        rows += gpu_rows(args, seeds, history, single)
    except Exception as err:  # noqa: BLE001 - report and go on without a GPU
        print(f"cupy backend: not measured ({err})")

    baseline = c_time and len(seeds) * work_per_seed / c_time
    print(f"\n{args.prng_type} mod {args.mod}, {args.draws} draws per seed, "
          f"{os.cpu_count()} CPUs; matches identical across all rows")
    print(f"{'what':<44} {'seeds':>10} {'seconds':>9} {'seed-draws/s':>14} {'vs C':>7}")
    for name, count, seconds in rows:
        rate = count * work_per_seed / seconds
        ratio = f"{rate / baseline:6.2f}x" if baseline else "     -"
        print(f"{name:<44} {count:>10} {seconds:>9.3f} {rate:>14,.0f} {ratio:>7}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB (input seeds alone: {seeds.nbytes / 2**20:.0f} MiB; "
          f"chunks of {cpu.CHUNK_SEEDS['compiled']} / {cpu.CHUNK_SEEDS['vectorized']} seeds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
