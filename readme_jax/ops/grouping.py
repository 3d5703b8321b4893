"""Token-to-expert grouping metadata shared by the expert FFN impls, the Pallas kernel and serving.

Conventions (every impl follows them):

- ``expert_T[t]`` in ``[0, E)`` names token t's expert. An id outside ``[0, E)`` (for example a
  padding token marked ``-1``) is *dropped*: the token joins no group and its FFN output row is 0.
  Host-side callers with concrete ids get a :class:`~readme_jax.errors.ShapeError` instead (see
  ``ops.expert_ffn``); dropping is what happens under ``jit``, where nothing can raise.
- Sorting is stable: inside a group tokens keep their original order.
- Dropped tokens sort after every group (they get the key ``E``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SortMeta(NamedTuple):
    """Where each token goes when tokens are sorted by expert.

    ``order_T``: sorted position i holds original token ``order_T[i]``.
    ``inv_T``: original token t sits at sorted position ``inv_T[t]`` (``order_T[inv_T] == arange``).
    ``sizes_E``: tokens per expert (dropped tokens not counted).
    ``offsets_E1``: ``[0, cumsum(sizes_E)]``; group e is ``order_T[offsets[e]:offsets[e+1]]``.
    """

    order_T: jax.Array
    inv_T: jax.Array
    sizes_E: jax.Array
    offsets_E1: jax.Array


def sort_keys(expert_T, num_experts: int):
    """``expert_T`` as int32 with out-of-range ids replaced by ``num_experts`` (the drop key)."""
    e = jnp.asarray(expert_T).astype(jnp.int32)
    return jnp.where((e >= 0) & (e < num_experts), e, num_experts)


def group_sizes(expert_T, num_experts: int):
    """Tokens per expert, ``int32[E]``; ids outside ``[0, E)`` are not counted (dropped)."""
    keys = sort_keys(expert_T, num_experts)
    return jnp.zeros((num_experts + 1,), jnp.int32).at[keys].add(1)[:num_experts]


def sort_by_expert(expert_T, num_experts: int) -> SortMeta:
    """Stable sort of tokens by expert id, plus group sizes and offsets (jit-able, static T)."""
    keys = sort_keys(expert_T, num_experts)
    T = keys.shape[0]
    order = jnp.argsort(keys, stable=True).astype(jnp.int32)
    inv = jnp.zeros((T,), jnp.int32).at[order].set(jnp.arange(T, dtype=jnp.int32))
    sizes = jnp.zeros((num_experts + 1,), jnp.int32).at[keys].add(1)[:num_experts]
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes, dtype=jnp.int32)])
    return SortMeta(order, inv, sizes, offsets)


def num_unique_experts(expert_T, num_experts: int) -> int:
    """Distinct in-range experts among concrete (host) ids; for schedulers and benchmarks."""
    e = np.asarray(expert_T)
    return int(np.unique(e[(e >= 0) & (e < num_experts)]).size)
