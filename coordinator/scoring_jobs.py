"""Step 3 on the head node: split survivors into chunk jobs, and make demo data."""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.errors import InvalidJobsError
from coordinator.files import write_json_atomically
from coordinator.legacy import SCORING_SCRIPT
from scoring.inputs import ScoringInputError, check_prng, load_history, parse_seeds, read_json
from scoring.prng import PRNGS, reference_draws
from worker_tasks.spec import FLOATING_NODE, is_safe_name


def parse_nodes(spec: str) -> list[tuple[str, int]]:
    """``rig-a,rig-b:2`` -> [(rig-a, 0), (rig-b, 0), (rig-b, 1)]: one slot per GPU."""
    slots: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if not is_safe_name(name):
            raise InvalidJobsError(f"--nodes: {name!r} is not a valid node name")
        try:
            gpus = int(count) if count else 1
        except ValueError:
            raise InvalidJobsError(f"--nodes: {part!r}: GPU count must be an integer") from None
        if gpus < 1:
            raise InvalidJobsError(f"--nodes: {part!r}: GPU count must be >= 1")
        slots.extend((name, gpu) for gpu in range(gpus))
    if not slots:
        raise InvalidJobsError("--nodes: give at least one node, e.g. rig-a,rig-b:2")
    return slots


@dataclass(frozen=True)
class ScoringJobs:
    jobs_file: Path
    chunk_files: list[Path]
    jobs: list[dict[str, Any]]


def generate_scoring_jobs(
    survivors: str | Path, train_history: str, nodes: str, chunks: int, prng_type: str,
    mod: int, jobs_file: str | Path, chunk_dir: str, output_dir: str = "full_scoring_results",
    skip: int = 0, workdir: str | Path = ".", balance: bool = False,
    balance_slots: int | None = None,
) -> ScoringJobs:
    """Write chunk seed files and a jobs file in the original format.

    Chunks are contiguous slices of the survivors, dealt round-robin over the
    nodes' GPU slots so every node gets the same share (give or take one);
    ``balance``: every job floats instead (node ``any``: the first free slot takes it),
    and with ``balance_slots`` (how many slots will take them) the chunks shrink as they
    go (``factoring_sizes``): the small ones come last, where the run's tail is decided.
    """
    base = Path(workdir)
    slots = parse_nodes(nodes)
    if chunks < 1:
        raise InvalidJobsError(f"--chunks {chunks}: must be >= 1")
    try:
        check_prng(prng_type, mod)
        data = read_json(survivors, "survivors file")
        parse_seeds(data, prng_type, f"seeds file {survivors}")
        load_history(base / train_history, mod)
    except ScoringInputError as err:
        raise InvalidJobsError(str(err)) from None
    if len(data) < chunks:
        raise InvalidJobsError(f"--chunks {chunks}: more chunks than survivors ({len(data)})")
    if balance and balance_slots:
        bounds = np.cumsum([0, *factoring_sizes(len(data), chunks, balance_slots)])
    else:
        bounds = np.linspace(0, len(data), chunks + 1).astype(int)
    jobs: list[dict[str, Any]] = []
    chunk_files: list[Path] = []
    for index in range(chunks):
        job_id = f"chunk_{index:04d}"
        seeds_file = posixpath.join(chunk_dir, f"{job_id}.json")
        path = base / seeds_file
        write_json_atomically(path, data[bounds[index]:bounds[index + 1]])
        chunk_files.append(path)
        node, gpu = slots[index % len(slots)]
        args = ["--seeds-file", seeds_file, "--train-history", train_history,
                "--output-file", posixpath.join(output_dir, f"{job_id}.json"),
                "--prng-type", prng_type, "--mod", str(mod)]
        if skip:
            args += ["--skip", str(skip)]
        jobs.append({"job_id": job_id, "script": SCORING_SCRIPT, "args": args,
                     "node": FLOATING_NODE if balance else node, "gpu_id": 0 if balance else gpu})
    jobs_path = write_json_atomically(jobs_file, jobs, indent=2)
    return ScoringJobs(jobs_file=jobs_path, chunk_files=chunk_files, jobs=jobs)


def factoring_sizes(total: int, chunks: int, slots: int) -> list[int]:
    """``chunks`` chunk sizes for ``total`` seeds, largest first, by factoring (Hummel,
    Schonberg and Flynn, 1992): each batch is half of the seeds left, cut into one chunk per
    slot; the chunks of the last batch share what is left. Every chunk holds a seed."""
    sizes: list[int] = []
    left = total
    while len(sizes) < chunks:
        still = chunks - len(sizes)
        if still <= slots:  # the last batch: what is left, evenly
            base, extra = divmod(left, still)
            sizes += [base + (index < extra) for index in range(still)]
            break
        # Half of what is left, one chunk per slot; enough kept for the chunks to come.
        size = min(math.ceil(left / (2 * slots)), (left - (still - slots)) // slots)
        sizes += [size] * slots
        left -= size * slots
    return sorted(sizes, reverse=True)


@dataclass(frozen=True)
class DemoData:
    survivors: Path
    history: Path
    secret: Path
    secret_seed: int
    position: int  # index of the secret seed among the candidates


def make_demo_data(
    out_dir: str | Path, candidates: int, draws: int, prng_type: str, mod: int,
    secret_seed: int | None = None, rng_seed: int = 2026,
) -> DemoData:
    """A history drawn from a secret seed, and candidates that contain it once."""
    try:
        check_prng(prng_type, mod)
    except ScoringInputError as err:
        raise InvalidJobsError(str(err)) from None
    if candidates < 1 or draws < 1:
        raise InvalidJobsError("--candidates and --draws must be >= 1")
    info = PRNGS[prng_type]
    rng = np.random.default_rng(rng_seed)
    low, high = max(info.seed_min, -(1 << 62)), min(info.seed_max, (1 << 62))
    if secret_seed is None:
        secret_seed = int(rng.integers(max(low, 1), high))
    elif not info.seed_min <= secret_seed <= info.seed_max:
        raise InvalidJobsError(f"--secret-seed {secret_seed} is out of range for {prng_type}")
    seeds = rng.integers(max(low, 1), high, size=candidates, dtype=np.int64)
    seeds = seeds[seeds != secret_seed]
    while seeds.shape[0] < candidates - 1:  # only if a random seed equalled the secret
        seeds = np.append(seeds, rng.integers(max(low, 1), high))
    seeds = seeds[: candidates - 1]
    position = int(rng.integers(0, candidates))
    seeds = np.insert(seeds, position, secret_seed)
    out = Path(out_dir)
    history = reference_draws(prng_type, secret_seed, mod, draws)
    result = DemoData(survivors=out / "survivors.json", history=out / "train_history.json",
                      secret=out / "secret.json", secret_seed=secret_seed, position=position)
    write_json_atomically(result.survivors, seeds.tolist())
    params = {"prng_type": prng_type, "mod": mod}
    write_json_atomically(result.history, {"draws": history, **params, "synthetic": True})
    write_json_atomically(result.secret, {"secret_seed": secret_seed, **params,
                                          "position": position})
    return result
