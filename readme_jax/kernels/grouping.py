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


# --------------------------------------------------------------------------- tile-padded layout


class TileMeta(NamedTuple):
    """Tokens sorted by expert with every group padded to a multiple of the row tile ``tm``.

    The padded buffer has ``P = N * tm`` rows in ``N`` static tiles; each tile holds rows of ONE
    expert, so a kernel can process tile n with expert ``tile_expert_N[n]``'s weights only.
    ``num_tiles`` (traced scalar) tiles are used; the rest are empty. Empty groups get no tile.

    ``row_src_P``: original token of padded row p, or ``T`` for a padding row (read as zeros).
    ``pos_T``: padded row of token t, or ``P`` for a dropped token (read as zeros).
    ``tile_expert_N``: expert of tile n; unused tiles repeat the last used tile's expert (so a
    pipelined kernel fetches no new weights for them).
    ``num_tiles``: int32 scalar, tiles actually used (``sum(ceil(sizes / tm))``).
    ``tile_rows_N``: real (non-padding) rows in tile n (0 for unused tiles).
    """

    row_src_P: jax.Array
    pos_T: jax.Array
    tile_expert_N: jax.Array
    num_tiles: jax.Array
    tile_rows_N: jax.Array


def max_tiles(num_tokens: int, num_experts: int, tm: int) -> int:
    """Static bound on tiles: ``ceil(T/tm) + min(E, T) - 1`` (one partial tile per extra group)."""
    if num_tokens == 0:
        return 1
    return -(-num_tokens // tm) + min(num_experts, num_tokens) - 1


def tile_layout(expert_T, num_experts: int, tm: int) -> TileMeta:
    """Tile-padded layout of tokens sorted by expert (jit-able; gathers only, no scatter)."""
    E = num_experts
    meta = sort_by_expert(expert_T, E)
    T = meta.order_T.shape[0]
    N = max_tiles(T, E, tm)
    tiles_E = (meta.sizes_E + tm - 1) // tm
    tile_end_E = jnp.cumsum(tiles_E, dtype=jnp.int32)              # first tile after group e
    tile_start_E = tile_end_E - tiles_E
    num_tiles = tile_end_E[-1]
    n = jnp.arange(N, dtype=jnp.int32)
    # Expert of tile n: the group whose tile range holds n; unused tiles clamp to the last used.
    n_used = jnp.minimum(n, jnp.maximum(num_tiles - 1, 0))
    tile_expert = jnp.searchsorted(tile_end_E, n_used, side="right").astype(jnp.int32)
    tile_expert = jnp.minimum(tile_expert, E - 1)
    # Rows: padded row p lies in tile p // tm at index `within` of its group.
    p = jnp.arange(N * tm, dtype=jnp.int32)
    pe = tile_expert[p // tm]
    within = p - tile_start_E[pe] * tm
    real = (p // tm < num_tiles) & (within < meta.sizes_E[pe])
    src = meta.order_T[jnp.clip(meta.offsets_E1[pe] + within, 0, max(T - 1, 0))]
    row_src = jnp.where(real, src, T).astype(jnp.int32)
    # Tokens: sorted position inv[t] of group e sits at padded row tile_start[e]*tm + inv - off[e].
    key = sort_keys(expert_T, E)
    ke = jnp.minimum(key, E - 1)
    pos = tile_start_E[ke] * tm + meta.inv_T - meta.offsets_E1[ke]
    pos = jnp.where(key < E, pos, N * tm).astype(jnp.int32)
    tile_rows = jnp.where(n < num_tiles,
                          jnp.clip(meta.sizes_E[tile_expert] - (n - tile_start_E[tile_expert]) * tm, 0, tm),
                          0).astype(jnp.int32)
    return TileMeta(row_src, pos, tile_expert, num_tiles.astype(jnp.int32), tile_rows)
