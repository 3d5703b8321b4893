"""JSON files the package writes: one encoder for numpy values, atomic writes (temp file + rename)."""

from __future__ import annotations

import enum
import json
import os
from pathlib import Path

import numpy as np


def json_default(o):
    """``json.dumps(default=...)`` for what results hold: numpy scalars and arrays, sets, tuples, paths, enums."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, enum.Enum):
        return o.name
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, default=json_default)


def write_json(path, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a reader sees the old file or the whole new one)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(obj))
    os.replace(tmp, path)
    return path
