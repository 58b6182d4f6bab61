"""Writing files the head node produces: always whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomically(path: str | Path, document: Any, indent: int | None = None) -> Path:
    """Write JSON to a temporary file beside ``path``, then rename it into place.

    Readers (and a crash half-way) never see a partial file. Parent
    directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=indent, separators=None if indent else (",", ":"))
            if indent:
                fh.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
