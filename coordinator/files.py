"""Writing files the head node produces: always whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson


def dump_json(document: Any, indent: bool = False) -> bytes:
    """JSON bytes: orjson (10x faster on a 100,000-job summary), else the standard library
    for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(document, option=orjson.OPT_INDENT_2 if indent else 0)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(document, indent=2 if indent else None,
                          separators=None if indent else (",", ":")).encode()


def write_json_atomically(path: str | Path, document: Any, indent: int | None = None) -> Path:
    """Write JSON to a temporary file beside ``path``, then rename it into place.

    Readers (and a crash half-way) never see a partial file. Parent
    directories are created. ``indent``: pretty-printed (two spaces).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(dump_json(document, indent=bool(indent)) + (b"\n" if indent else b""))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
