"""Step 3 full scoring: score candidate PRNG seeds against a lottery draw history.

For each seed, ``matches`` is the number of positions i where the seed's i-th
draw (after ``--skip``) equals history[i]; ``score = matches / len(history)``.
The output is one JSON document, written atomically (temporary file, rename).

Exit status: 0 scored; 2 bad input (nothing written); 3 backend unavailable;
4 the output could not be written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from scoring import cpu
from scoring.backends import BACKEND_CHOICES, BackendUnavailable, select_backend
from scoring.inputs import ScoringInputError, check_prng, load_history, load_seeds
from scoring.prng import PRNGS

EXIT_BAD_INPUT = 2
EXIT_NO_BACKEND = 3
EXIT_CANNOT_WRITE = 4

EPILOG = """\
example:
  full-scoring-worker --seeds-file scoring_chunks/chunk_0000.json \\
      --train-history train_history.json \\
      --output-file full_scoring_results/chunk_0000.json \\
      --prng-type java_lcg --mod 1000

PRNG types:
""" + "\n".join(f"  {name:<11} {info.description}" for name, info in PRNGS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="full_scoring_worker.py",
        description="Score every candidate seed against a draw history (Step 3).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seeds-file", required=True,
                        help="JSON list of seeds, or of objects with a 'seed' field")
    parser.add_argument("--train-history", required=True,
                        help="JSON list of draws, or an object with a 'draws' list")
    parser.add_argument("--output-file", required=True, help="where the scores are written")
    parser.add_argument("--prng-type", required=True, help=f"one of {', '.join(PRNGS)}")
    parser.add_argument("--mod", type=int, required=True, help="draws are taken modulo this")
    parser.add_argument("--skip", type=int, default=0,
                        help="outputs discarded before the first compared draw (default 0)")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="cupy (GPU), numpy (CPU) or auto: GPU when usable (default)")
    return parser


def build_document(args: argparse.Namespace, backend: str, seeds: Any, counts: np.ndarray,
                   n_draws: int) -> dict[str, Any]:
    scores = counts / n_draws
    if seeds.records is not None:
        results = [dict(record, seed=record["seed"], matches=int(m), score=float(s))
                   for record, m, s in zip(seeds.records, counts, scores, strict=True)]
    else:
        results = [{"seed": int(seed), "matches": int(m), "score": float(s)}
                   for seed, m, s in zip(seeds.values.tolist(), counts, scores, strict=True)]
    return {
        "prng_type": args.prng_type, "mod": args.mod, "skip": args.skip,
        "n_draws": n_draws, "n_seeds": len(results), "backend": backend, "results": results,
    }


def write_atomically(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(document, fh, separators=(",", ":"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    if args.skip < 0:
        raise ScoringInputError(f"--skip {args.skip}: must be >= 0")
    check_prng(args.prng_type, args.mod)
    history = load_history(args.train_history, args.mod)
    seeds = load_seeds(args.seeds_file, args.prng_type)
    backend = select_backend(args.backend)
    detail = backend.detail
    if backend.name == "numpy":
        engine = cpu.choose_engine(args.prng_type, len(seeds.values), args.skip + len(history))
        if engine == "compiled" and cpu.load_compiled() is None:  # what cpu.matches falls to
            engine = ("vectorized (the compiled engine needs Numba: pip install "
                      "'scripts-coordinator[worker]')")
        detail = f"{detail}; engine for this file: {engine}"
    print(f"backend: {backend.name} ({detail})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    counts = backend.matches(args.prng_type, seeds.values, history, args.mod, args.skip)
    elapsed = time.perf_counter() - started
    write_atomically(Path(args.output_file),
                     build_document(args, backend.name, seeds, counts, len(history)))
    rate = len(counts) * len(history) / elapsed if elapsed > 0 else float("inf")
    best = int(counts.max()) if len(counts) else 0
    print(f"scored {len(counts)} seeds x {len(history)} draws in {elapsed:.3f} s "
          f"({rate:,.0f} seed-draws/s); best matches {best}; wrote {args.output_file}",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ScoringInputError as err:
        print(f"full_scoring_worker: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BackendUnavailable as err:
        print(f"full_scoring_worker: error: {err}", file=sys.stderr)
        return EXIT_NO_BACKEND
    except OSError as err:
        print(f"full_scoring_worker: error: cannot write {args.output_file}: {err}",
              file=sys.stderr)
        return EXIT_CANNOT_WRITE


if __name__ == "__main__":
    sys.exit(main())
