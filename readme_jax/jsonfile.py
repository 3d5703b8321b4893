"""JSON files the package writes: one encoder for numpy values, atomic writes (temp file + rename)."""

from __future__ import annotations

import enum
import json
import math
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


def dumps(obj, strict: bool = False) -> str:
    return json.dumps(obj, indent=1, default=json_default, allow_nan=not strict)


def nonfinite_keys(obj, prefix: str = "") -> list[str]:
    """Dotted paths of every NaN/Inf float in a nested dict/list (numpy values included)."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in nonfinite_keys(v, f"{prefix}{key}.")]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in nonfinite_keys(v, f"{prefix}{i}.")]
    if isinstance(obj, np.ndarray):
        return [f"{prefix}{tuple(int(j) for j in i)}"
                for i in np.argwhere(~np.isfinite(obj))] if obj.dtype.kind == "f" else []
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return [prefix.rstrip(".")]
    return []


def write_json(path, obj, strict: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a reader sees the old file or the whole new one).

    ``strict``: NaN/Inf are refused (JSON has no such values) with a ValueError naming their keys,
    before anything is written.
    """
    path = Path(path)
    if strict:
        bad = nonfinite_keys(obj)
        if bad:
            raise ValueError(f"non-finite values at {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    text = dumps(obj, strict)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def read_json(path):
    """Parse a JSON file strictly (NaN/Infinity refused); ValueError on any defect."""
    return json.loads(Path(path).read_text(), parse_constant=_refuse_constant)
