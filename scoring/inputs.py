"""Reading and checking the scoring inputs: the seeds file and the draw history.

Every problem is a ``ScoringInputError`` whose text names the file and the
first bad element, so the worker can print one line and exit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scoring.prng import PRNGS


class ScoringInputError(ValueError):
    """A scoring input is unreadable or out of range."""


@dataclass(frozen=True)
class Seeds:
    """Candidate seeds, and the survivor objects they came from (if any)."""

    values: np.ndarray  # int64 for java_lcg (Java longs), uint64 otherwise
    records: list[dict[str, Any]] | None  # survivor objects, carried into the output


def read_json(path: str | Path, what: str) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ScoringInputError(f"{what} {path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ScoringInputError(
            f"{what} {path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ScoringInputError(f"{what} {path}: cannot read: {err}") from None


def check_prng(prng_type: str, mod: int) -> None:
    if prng_type not in PRNGS:
        raise ScoringInputError(
            f"unknown PRNG {prng_type!r}; choose one of {', '.join(PRNGS)}"
        )
    info = PRNGS[prng_type]
    if not 1 <= mod <= info.mod_max:
        raise ScoringInputError(
            f"--mod {mod}: must be between 1 and {info.mod_max} for {prng_type}"
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_seeds(data: Any, prng_type: str, source: str = "seeds") -> Seeds:
    """Seeds from a JSON list of integers or of objects with a ``seed`` field.

    ``source`` starts every error (``seeds file chunk.json``).
    """
    if not isinstance(data, list):
        raise ScoringInputError(
            f"{source}: expected a JSON list of seeds, got {type(data).__name__}"
        )
    info = PRNGS[prng_type]
    records: list[dict[str, Any]] | None = None
    if data and isinstance(data[0], dict):
        records = data
        values: list[Any] = []
        for index, item in enumerate(data):
            if not isinstance(item, dict) or "seed" not in item:
                raise ScoringInputError(
                    f"{source}: element {index}: expected an object with a 'seed' field"
                )
            values.append(item["seed"])
    else:
        values = data
    for index, seed in enumerate(values):
        if not is_int(seed):
            raise ScoringInputError(
                f"{source}: element {index}: seed {seed!r} is not an integer"
            )
        if not info.seed_min <= seed <= info.seed_max:
            raise ScoringInputError(
                f"{source}: element {index}: seed {seed} is out of range for "
                f"{prng_type} [{info.seed_min}, {info.seed_max}]"
            )
    dtype = np.int64 if info.seed_min < 0 else np.uint64
    return Seeds(values=np.array(values, dtype=dtype), records=records)


def parse_history(data: Any, mod: int, source: str = "history") -> np.ndarray:
    """Draws from a JSON list of integers or an object with a ``draws`` list (see ``source``
    at ``parse_seeds``)."""
    draws = data.get("draws") if isinstance(data, dict) else data
    if not isinstance(draws, list):
        raise ScoringInputError(
            f"{source}: expected a list of draws or an object with a 'draws' list"
        )
    if not draws:
        raise ScoringInputError(f"{source}: the history has no draws")
    for index, draw in enumerate(draws):
        if not is_int(draw):
            raise ScoringInputError(
                f"{source}: draw {index}: {draw!r} is not an integer"
            )
        if not 0 <= draw < mod:
            raise ScoringInputError(
                f"{source}: draw {index}: {draw} is outside [0, {mod}) for --mod {mod}"
            )
    return np.array(draws, dtype=np.int64)


def load_seeds(path: str | Path, prng_type: str) -> Seeds:
    return parse_seeds(read_json(path, "seeds file"), prng_type, f"seeds file {path}")


def load_history(path: str | Path, mod: int) -> np.ndarray:
    return parse_history(read_json(path, "history file"), mod, f"history file {path}")
