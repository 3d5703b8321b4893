"""The step's expert FFN: tokens sorted by expert once, each present expert run once on a row tile.

The experts are **slots**: a tuple of per-expert weight dicts ``{"wg": [L, D, R], "wu": [L, D, R],
"wd": [L, R, D]}`` (every expert of the model, or the expert store's pool for this call); a token's
route is its slot index (-1: padding). The tuple is an argument of the jitted step, not a scan
input: a layer reads its slice of an expert (``w[layer]``) inside that expert's branch, so the
experts no token routes to are never read. (Passing the ``[L, E, ...]`` stacks through the layer
scan would copy every expert's slice each layer: measured about 3x slower at batch 1 on XLA:CPU.)

Per step, :func:`group_plan` sorts the tokens by slot (shared by every layer). Per layer,
:func:`grouped_experts` runs each slot with tokens on the smallest row tile of :data:`ROW_TILES`
(then all N rows) that holds its contiguous group, chosen by ``lax.switch`` at run time; tile
rows past the group are masked to 0. Rows computed: at most about ``sum_e max(8, 4 n_e)``, not
``K x N``; the number of experts present is a runtime value, not a compiled shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from readme_jax.model import layers

EXPERT_KEYS = ("wg", "wu", "wd")
# row tiles an expert's group may run in (then the whole step, N rows). Down to one row: on XLA:CPU a
# one-row matmul streams the weights about 3x faster than an 8-row one, and in a decode step of a few
# requests most experts hold one or two tokens
ROW_TILES = (1, 2, 4, 8, 32)


def expert_slots(layers_params: dict) -> tuple[dict, ...]:
    """The model's experts as slots: ``wg [L, E, D, R]`` etc. cut into E dicts of ``[L, D, R]``."""
    E = layers_params["wg"].shape[1]
    return tuple({k: layers_params[k][:, e] for k in EXPERT_KEYS} for e in range(E))


def group_plan(route_N, n_slots: int):
    """``(order_N, starts_X, counts_X)``: the stable permutation that sorts tokens by slot
    (padding, route -1, last), where each slot's group starts in that order, and its size."""
    key = jnp.where(route_N < 0, n_slots, route_N)
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=n_slots + 1)[:n_slots].astype(jnp.int32)
    return order.astype(jnp.int32), (jnp.cumsum(counts) - counts).astype(jnp.int32), counts


def grouped_experts(x_ND, plan, slots: tuple, layer):
    """Each token's own expert's SwiGLU at ``layer`` (float32 ``[N, D]``; padding rows 0)."""
    order, starts, counts = plan
    N, D = x_ND.shape
    sizes = tuple(t for t in ROW_TILES if t < N) + (N,)
    xs = x_ND[order]
    xs = jnp.concatenate([xs, jnp.zeros((sizes[-1], D), xs.dtype)])  # a tile may start at any row
    y = jnp.zeros((N + sizes[-1], D), jnp.float32)
    for k, w in enumerate(slots):
        def tile(y, rows, k=k, w=w):
            start, n = starts[k], counts[k]
            xt = jax.lax.dynamic_slice_in_dim(xs, start, rows)
            yt = layers.swiglu(xt, w["wg"][layer], w["wu"][layer], w["wd"][layer]).astype(jnp.float32)
            yt = jnp.where((jnp.arange(rows) < n)[:, None], yt, 0.0)
            return jax.lax.dynamic_update_slice_in_dim(y, jax.lax.dynamic_slice_in_dim(y, start, rows) + yt, start, 0)

        branches = [lambda y: y] + [lambda y, rows=rows, tile=tile: tile(y, rows) for rows in sizes]
        pick = jnp.where(counts[k] == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, jnp.int32), counts[k]))
        y = jax.lax.switch(pick, branches, y)
    return jnp.zeros((N, D), jnp.float32).at[order].set(y[:N])
