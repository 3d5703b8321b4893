"""The one NaN/Inf check of loaded weights: a corrupt checkpoint fails at load, naming the tensor.

Every loader (GGUF, HF safetensors, orbax ``load_model``, the Read-ME orbax pair and export) calls
:func:`check_finite` on each float tensor it reads (or :func:`check_finite_tree` on a restored
pytree), before any computation sees it. Integer tensors (e.g. the export's channel indices) are
skipped. Device arrays are reduced where they live; only a failing tensor is counted in detail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.errors import CheckpointError


def _is_float(dtype) -> bool:
    if dtype is None:
        return False
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:
        return False


def _all_finite(a) -> bool:
    if isinstance(a, jax.Array):
        return bool(jnp.isfinite(a).all())
    return bool(np.isfinite(a).all())


def check_finite(array, tensor: str, where, problem: str = "the checkpoint is corrupt") -> None:
    """Raise CheckpointError if float ``array`` (numpy or jax) holds a NaN or an Inf.

    ``where`` is the file or folder the tensor came from, ``tensor`` its name there, ``problem``
    what it means (the message's end).
    """
    if not _is_float(getattr(array, "dtype", None)) or _all_finite(array):
        return
    a = np.asarray(array)
    n_nan = int(np.isnan(a).sum())
    n_inf = int(np.isinf(a).sum())
    raise CheckpointError(f"{where}: tensor {tensor!r} has {n_nan} NaN / {n_inf} Inf values (of {a.size}); {problem}")


def check_finite_tree(tree, where, prefix: str = "") -> None:
    """:func:`check_finite` on every leaf of a nested dict of arrays, naming leaves ``a.b.c``."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_finite_tree(v, where, f"{prefix}.{k}" if prefix else str(k))
        return
    check_finite(tree, prefix, where)
