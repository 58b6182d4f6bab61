"""Step 3 scoring: PRNGs exact against Java and C++ references, backends, the script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from scoring import cpu, vectorized
from scoring.backends import select_backend
from scoring.prng import PRNGS, reference_draws, reference_matches
from scoring.states import initial_states
from tests.toolchains import require

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "full_scoring_worker.py"

JAVA_SOURCE = """
public class Draws {
    public static void main(String[] a) {
        long seed = Long.parseLong(a[0]); int bound = Integer.parseInt(a[1]);
        int n = Integer.parseInt(a[2]);
        java.util.Random r = new java.util.Random(seed);
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < n; i++) sb.append(r.nextInt(bound)).append(' ');
        System.out.println(sb.toString().trim());
    }
}
"""

CPP_SOURCE = """
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
int main(int argc, char** argv) {
    unsigned long long seed = strtoull(argv[2], 0, 10), mod = strtoull(argv[3], 0, 10);
    int n = atoi(argv[4]);
    if (!strcmp(argv[1], "mt19937")) {
        std::mt19937 g((std::mt19937::result_type)seed);
        for (int i = 0; i < n; i++) printf("%llu ", (unsigned long long)(g() % mod));
    } else if (!strcmp(argv[1], "xorshift32")) {
        /* Marsaglia 2003, shifts 13/17/5; the output is the new state. */
        unsigned int x = (unsigned int)seed;
        for (int i = 0; i < n; i++) {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5;
            printf("%llu ", (unsigned long long)(x % mod));
        }
    } else {
        std::minstd_rand g((std::minstd_rand::result_type)seed);
        for (int i = 0; i < n; i++) printf("%llu ", (unsigned long long)(g() % mod));
    }
    printf("\\n");
}
"""


@pytest.fixture(scope="module")
def java_draws(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    require("javac", "java", purpose="the java.util.Random reference")
    work = tmp_path_factory.mktemp("java")
    (work / "Draws.java").write_text(JAVA_SOURCE)
    subprocess.run(["javac", "Draws.java"], cwd=work, check=True, timeout=120)

    def draws(seed: int, bound: int, n: int) -> list[int]:
        out = subprocess.run(["java", "-cp", str(work), "Draws", str(seed), str(bound), str(n)],
                             capture_output=True, text=True, check=True, timeout=60)
        return [int(v) for v in out.stdout.split()]

    return draws


@pytest.fixture(scope="module")
def cpp_draws(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    require("g++", purpose="the std::mt19937, std::minstd_rand and xorshift32 references")
    compiler = shutil.which("g++")
    work = tmp_path_factory.mktemp("cpp")
    (work / "draws.cpp").write_text(CPP_SOURCE)
    subprocess.run([compiler, "-O1", "-o", "draws", "draws.cpp"], cwd=work, check=True,
                   timeout=120)

    def draws(kind: str, seed: int, mod: int, n: int) -> list[int]:
        out = subprocess.run([str(work / "draws"), kind, str(seed), str(mod), str(n)],
                             capture_output=True, text=True, check=True, timeout=60)
        return [int(v) for v in out.stdout.split()]

    return draws


# Java's Random(seed) whose first 31-bit draw is 2**31 - 1 (the LCG inverted by hand): at
# bound 2**31 - 1 the only value nextInt rejects, so the redraw loop runs, once.
REDRAW_SEED = 142379987759401


@pytest.mark.parametrize(("seed", "bound"), [
    (42, 10), (0, 1000), (-1, 1000), (2**63 - 1, 1000), (-(2**63), 7), (123456789, 16),
    (987654321, 1 << 30), (31337, 2**31 - 1), (5, 1_500_000_000), (77, 1),
    (11, 715_827_883),  # 3 x 715827883 = 2**31 + 1: the rejection test's exact edge, often
    (REDRAW_SEED, 2**31 - 1),  # the first draw is 2**31 - 1 itself: rejected, drawn again
])
def test_java_lcg_is_java_util_random(java_draws, seed: int, bound: int) -> None:  # noqa: ANN001
    assert reference_draws("java_lcg", seed, bound, 200) == java_draws(seed, bound, 200)


@pytest.mark.parametrize("kind", ["mt19937", "minstd", "xorshift32"])
@pytest.mark.parametrize(("seed", "mod"), [(5489, 2**32), (1, 1000), (0, 7), (2**32 - 1, 1000),
                                           (2147483647, 97), (4294967294, 2**31)])
def test_cpp_engines_match_std(cpp_draws, kind: str, seed: int, mod: int) -> None:  # noqa: ANN001
    if kind == "minstd" and mod > PRNGS["minstd"].mod_max:
        mod = PRNGS["minstd"].mod_max
    if kind == "xorshift32" and seed == 0:
        seed = 1  # xorshift32's state may not be 0
    # 1300 draws: past two mt19937 state regenerations.
    assert reference_draws(kind, seed, mod, 1300) == cpp_draws(kind, seed, mod, 1300)


def test_known_values_without_toolchains() -> None:
    # Published check values: C++ [rand.predef] 10000th outputs, and Java's Random(42).
    assert reference_draws("mt19937", 5489, 2**32, 1, skip=9999) == [4123659995]
    assert reference_draws("minstd", 1, 2**31, 1, skip=9999) == [399268537]
    assert reference_draws("java_lcg", 42, 10, 5) == [0, 3, 8, 4, 0]
    # xorshift32 (Marsaglia 2003, 13/17/5) from state 1.
    assert reference_draws("xorshift32", 1, 2**32, 3) == [270369, 67634689, 2647435461]


def random_seeds(prng: str, n: int, rng: np.random.Generator) -> np.ndarray:
    info = PRNGS[prng]
    low, high = max(info.seed_min, -(2**62)), min(info.seed_max, 2**62)
    seeds = rng.integers(low, high, size=n, dtype=np.int64)
    if prng == "xorshift32":
        seeds[seeds == 0] = 1
    extremes = [info.seed_min, info.seed_max] if prng == "java_lcg" else [info.seed_max, 1]
    dtype = np.int64 if info.seed_min < 0 else np.uint64
    return np.concatenate([seeds.astype(dtype), np.array(extremes, dtype=dtype)])


@pytest.mark.parametrize("engine", ["compiled", "vectorized"])
@pytest.mark.parametrize("prng", list(PRNGS))
# 1,500,000,000: Java's nextInt rejects about 30% of draws for this bound (the redraw path);
# 715,827,883: a third of the draws land exactly on the rejection test's edge (>= vs >).
@pytest.mark.parametrize(("mod", "skip"), [(1000, 0), (16, 3), (7, 650), (2**31 - 1, 1),
                                           (1_500_000_000, 2), (715_827_883, 0)])
def test_cpu_backend_equals_reference(engine: str, prng: str, mod: int, skip: int) -> None:
    # A fixed seed per case (hash() changes between runs): a failure can be reproduced.
    rng = np.random.default_rng(zlib.crc32(f"{prng}/{mod}/{skip}".encode()))
    seeds = random_seeds(prng, 60, rng)
    secret = int(seeds[5])
    history = reference_draws(prng, secret, mod, 40, skip)
    # Blend in noise so matches vary between 0 and len(history).
    history = [h if i % 3 else int(rng.integers(0, mod)) for i, h in enumerate(history)]
    got = cpu.matches(prng, seeds, np.array(history), mod, skip, chunk=17, engine=engine)
    want = [reference_matches(prng, int(s), history, mod, skip) for s in seeds]
    assert got.dtype == np.int32 and got.tolist() == want
    assert got[5] >= 26
    if skip == 0:  # the default skip is 0, for the engines and the reference alike
        assert cpu.matches(prng, seeds, np.array(history), mod, engine=engine).tolist() == [
            reference_matches(prng, int(s), history, mod) for s in seeds]


@pytest.mark.parametrize("prng", list(PRNGS))
def test_vectorized_kernels_return_int32_and_leave_their_input_alone(prng: str) -> None:
    rng = np.random.default_rng(zlib.crc32(prng.encode()))
    states = initial_states(prng, random_seeds(prng, 12, rng))
    before = states.copy()
    history = np.array(reference_draws(prng, 7, 1000, 20), dtype=np.int64)
    out = vectorized.KERNELS[prng](states, history, 1000, 0)
    assert out.dtype == np.int32 and out.shape == (14,)
    assert np.array_equal(states, before)


def test_xorshift32_refuses_a_zero_state() -> None:
    for seed in (0, 2**32, 5 * 2**32):  # the state is the low 32 bits
        with pytest.raises(ValueError) as caught:
            reference_draws("xorshift32", seed, 1000, 3)
        assert str(caught.value) == "xorshift32 seed must not be 0 (the state would stay 0)"
    assert reference_draws("xorshift32", 2**32 + 1, 2**32, 1) == [270369]  # state 1


def test_the_compiled_engine_missing_is_said_and_auto_falls_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Where Numba does not import, load_compiled() returns None (simulated here).
    monkeypatch.setattr(cpu, "load_compiled", lambda: None)
    seeds = np.arange(1, 4, dtype=np.uint64)
    with pytest.raises(RuntimeError) as caught:
        cpu.matches("minstd", seeds, np.array([1, 2]), 1000, engine="compiled")
    assert str(caught.value) == ("the compiled CPU engine needs Numba, which does not import "
                                 "here")
    # auto on work big enough for the compiled engine stays vectorised, same matches.
    history = np.array(reference_draws("java_lcg", 3, 1000, 200_000))
    got = cpu.matches("java_lcg", np.array([3, 4, 5], dtype=np.int64), history, 1000)
    assert got.tolist() == [200_000, reference_matches("java_lcg", 4, history.tolist(), 1000),
                            reference_matches("java_lcg", 5, history.tolist(), 1000)]


def test_auto_engine_follows_the_amount_of_work() -> None:
    assert cpu.choose_engine("java_lcg", 30_000, 100) == "vectorized"
    assert cpu.choose_engine("java_lcg", 1_000_000, 100) == "compiled"
    assert cpu.choose_engine("mt19937", 40_000, 100) == "vectorized"
    assert cpu.choose_engine("mt19937", 100_000, 100) == "compiled"  # seeding dominates
    assert cpu.choose_engine("java_lcg", 10, 10, engine="compiled") == "compiled"
    # At the threshold exactly (100 million steps), and one seed-step below it.
    assert cpu.choose_engine("xorshift32", 1_000_000, 100) == "compiled"
    assert cpu.choose_engine("xorshift32", 999_999, 100) == "vectorized"
    assert cpu.choose_engine("minstd", 1_000_000, 99) == "vectorized"
    assert cpu.choose_engine("mt19937", 100_000, 1000 - 2 * 624) == "compiled"
    with pytest.raises(ValueError) as caught:
        cpu.choose_engine("java_lcg", 1, 1, engine="gpu")
    assert str(caught.value) == "unknown CPU engine 'gpu'; choose auto, compiled, vectorized"


def test_select_backend_falls_back_to_cpu_and_refuses_cupy_without_gpu() -> None:
    from scoring.backends import BackendUnavailable
    from scoring.gpu import GpuUnavailable, probe

    try:
        probe()
    except GpuUnavailable:
        assert select_backend("auto").name == "numpy"
        with pytest.raises(BackendUnavailable, match="--backend cupy"):
            select_backend("cupy")
    else:
        assert select_backend("auto").name == "cupy"


def test_gpu_backend_is_bit_identical_to_cpu() -> None:
    from scoring import gpu

    try:
        gpu.probe()
    except gpu.GpuUnavailable as err:
        pytest.skip(f"no GPU for the parity test: {err}")
    rng = np.random.default_rng(7)
    for prng in PRNGS:
        for mod, skip in [(1000, 0), (16, 2), (2**31 - 1, 1)]:
            seeds = random_seeds(prng, 5000, rng)
            history = np.array(reference_draws(prng, int(seeds[9]), mod, 50, skip))
            assert np.array_equal(gpu.matches(prng, seeds, history, mod, skip),
                                  cpu.matches(prng, seeds, history, mod, skip)), (prng, mod)


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def scoring_args(seeds: str = "seeds.json", history: str = "history.json",
                 out: str = "out/scores.json", prng: str = "java_lcg",
                 mod: str = "1000") -> list[str]:
    return ["--seeds-file", seeds, "--train-history", history, "--output-file", out,
            "--prng-type", prng, "--mod", mod]


def test_script_scores_survivor_objects_and_writes_one_document(tmp_path: Path) -> None:
    history = reference_draws("java_lcg", 99, 1000, 30, skip=2)
    (tmp_path / "history.json").write_text(json.dumps({"draws": history}))
    survivors = [{"seed": 98, "origin": "window_3"}, {"seed": 99, "origin": "window_1"}]
    (tmp_path / "seeds.json").write_text(json.dumps(survivors))
    result = run_script(*scoring_args(), "--skip", "2", "--backend", "numpy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "backend: numpy" in result.stderr
    doc = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert {k: doc[k] for k in ("prng_type", "mod", "skip", "n_draws", "backend")} == {
        "prng_type": "java_lcg", "mod": 1000, "skip": 2, "n_draws": 30, "backend": "numpy"}
    assert doc["results"][1] == {"seed": 99, "origin": "window_1", "matches": 30, "score": 1.0}
    assert doc["results"][0]["origin"] == "window_3"
    assert doc["results"][0]["matches"] == reference_matches("java_lcg", 98, history, 1000, 2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scores.json"]  # no temp left


@pytest.mark.parametrize(("seeds", "history", "extra", "expected"), [
    ("[1, 2, \"x\"]", "[1, 2]", [], "seeds file seeds.json: element 2: seed 'x' is not an integer"),
    ("[1, 2.5]", "[1, 2]", [], "element 1: seed 2.5 is not an integer"),
    ("[1, 9223372036854775808]", "[1]", [], "element 1: seed 9223372036854775808 is out of range"),
    ("[{\"s\": 1}]", "[1]", [], "element 0: expected an object with a 'seed' field"),
    ("{\"seeds\": 1}", "[1]", [], "expected a JSON list of seeds"),
    ("[1]", "[1, 1000]", [], "history file history.json: draw 1: 1000 is outside [0, 1000)"),
    ("[1]", "{\"draws\": []}", [], "the history has no draws"),
    ("[1]", "{\"x\": [1]}", [], "expected a list of draws"),
    ("[1]", "[1, true]", [], "draw 1: True is not an integer"),
    ("[1", "[1]", [], "seeds file seeds.json: invalid JSON at line 1, column 3"),
    ("[1]", "[1]", ["--prng-type", "lcg"], "unknown PRNG 'lcg'"),
    ("[1]", "[0]", ["--mod", "0"], "--mod 0: must be between 1"),
    ("[0]", "[1]", ["--prng-type", "xorshift32"], "seed 0 is out of range for xorshift32"),
    ("[-1]", "[1]", ["--prng-type", "mt19937"], "seed -1 is out of range for mt19937"),
    ("[1]", "[1]", ["--skip", "-1"], "--skip -1: must be >= 0"),
])
def test_script_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, seeds: str, history: str, extra: list[str], expected: str
) -> None:
    (tmp_path / "seeds.json").write_text(seeds)
    (tmp_path / "history.json").write_text(history)
    result = run_script(*scoring_args(), *extra, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("full_scoring_worker: error: ")
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_script_unwritable_output_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "seeds.json").write_text("[1, 2]")
    (tmp_path / "history.json").write_text("[1]")
    (tmp_path / "out").write_text("a file, not a directory")
    result = run_script(*scoring_args(out="out/scores.json"), cwd=tmp_path)
    assert result.returncode == 4
    assert result.stderr.strip().splitlines()[-1].startswith(
        "full_scoring_worker: error: cannot write out/scores.json:")
    assert "Traceback" not in result.stderr


def test_script_missing_file_and_cupy_without_gpu(tmp_path: Path) -> None:
    (tmp_path / "history.json").write_text("[1]")
    result = run_script(*scoring_args(seeds="nope.json"), cwd=tmp_path)
    assert result.returncode == 2 and "seeds file nope.json: file not found" in result.stderr
    (tmp_path / "seeds.json").write_text("[1]")
    from scoring.gpu import GpuUnavailable, probe

    try:
        probe()
    except GpuUnavailable:
        result = run_script(*scoring_args(), "--backend", "cupy", cwd=tmp_path)
        assert result.returncode == 3
        assert "--backend cupy:" in result.stderr
        assert not (tmp_path / "out").exists()
    else:  # a GPU is here: the cupy backend must then work
        result = run_script(*scoring_args(), "--backend", "cupy", cwd=tmp_path)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("engine", ["compiled", "vectorized"])
def test_java_redraw_at_the_largest_bound(engine: str) -> None:
    mod = 2**31 - 1
    draws = reference_draws("java_lcg", REDRAW_SEED, mod, 6)
    assert draws[0] == 2147291273  # not 2**31 - 1: that draw was rejected
    seeds = np.array([REDRAW_SEED, 1, REDRAW_SEED + 1], dtype=np.int64)
    got = cpu.matches("java_lcg", seeds, np.array(draws), mod, 0, engine=engine)
    assert got.tolist() == [6, *(reference_matches("java_lcg", int(s), draws, mod)
                                 for s in seeds[1:])]


@pytest.mark.parametrize("mod", [1, 3, 7, 10, 999, 1000, 12345, 2**30 + 1, 1_500_000_000,
                                 2**31 - 1])
def test_java_modulo_magic_is_exact(mod: int) -> None:
    magic, shift = cpu.java_magic(mod)
    rng = np.random.default_rng(mod)
    values = np.concatenate([rng.integers(0, 2**31, 20000),
                             [0, 1, mod - 1, mod, mod + 1, 2**31 - 2, 2**31 - 1]])
    values = values[values < 2**31].astype(object)  # exact Python integers
    assert magic * (2**31 - 1) < 2**63  # the product fits a signed 64-bit register
    assert all((int(u) * magic) >> shift == int(u) // mod for u in values)


def test_the_reference_refuses_a_history_it_cannot_line_up() -> None:
    """The plain loop compares draw i with history entry i: histories it would silently cut
    short (zip) are an error, not fewer matches."""
    history = reference_draws("java_lcg", 7, 1000, 5)
    assert reference_matches("java_lcg", 7, history, 1000) == 5

    class Short(list):  # a history that claims one entry more than it yields
        def __len__(self) -> int:
            return super().__len__() + 1

    with pytest.raises(ValueError, match="shorter"):
        reference_matches("java_lcg", 7, Short(history), 1000)


def test_a_process_that_loaded_the_compiled_loops_uses_them_for_less_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a warm worker's zygote does (``compiled.load_all``) lowers the work from which
    the compiled engine is chosen: 50,000 seeds of 1,000 draws is under the cold threshold
    and over the loaded one."""
    import sys

    from scoring import compiled

    work = (50_000, 1000)
    monkeypatch.setattr(compiled, "LOADED", False)
    assert not cpu.compiled_loaded() and cpu.choose_engine("java_lcg", *work) == "vectorized"
    compiled.load_all()
    assert cpu.compiled_loaded() and cpu.choose_engine("java_lcg", *work) == "compiled"
    assert cpu.choose_engine("java_lcg", 10, 10) == "vectorized"
    monkeypatch.delitem(sys.modules, "scoring.compiled")
    assert not cpu.compiled_loaded()
