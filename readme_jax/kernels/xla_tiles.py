"""The XLA (non-Pallas) expert FFN: the ``"xla"`` impl of ``ops.expert_ffn`` and the tile loop
whose transpose is also the Pallas kernel's backward.

Tokens are sorted by expert (stable), run through grouped matmuls over the contiguous groups,
then unsorted; every permutation's backward is the inverse gather (``custom_vjp``, no scatter).
Two strategies (``xla_ffn``): a loop over expert tiles of a tile-padded layout
(``kernels.grouping.tile_layout``; default off TPU) or ``lax.ragged_dot`` (default on TPU).

A leaf of ``readme_jax.kernels``: imports only ``kernels.grouping``, ``kernels.vma`` and ``readme_jax.errors``,
so both the dispatcher (``ops.expert_ffn``) and the Pallas kernel (``kernels.expert_ffn_pallas``)
can import it without a cycle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from readme_jax.errors import ShapeError
from readme_jax.kernels import grouping
from readme_jax.kernels.vma import sum_to_vma, vary_like


# --------------------------------------------------------------------------- compute dtype


def compute_dtype(x, wg):
    """The dtype matmul operands are cast to: the promotion of x's and the weights' dtypes."""
    return jnp.promote_types(x.dtype, wg.dtype)


# --------------------------------------------------------------------------- row permutations


@jax.custom_vjp
def permute_rows(x, idx, inv_idx):
    """``x[idx]`` for a permutation ``idx`` with inverse ``inv_idx``; backward is ``g[inv_idx]``."""
    return jnp.take(x, idx, axis=0)


def _permute_fwd(x, idx, inv_idx):
    return jnp.take(x, idx, axis=0), (idx, inv_idx)


def _permute_bwd(res, g):
    idx, inv_idx = res
    return jnp.take(g, inv_idx, axis=0), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


# --------------------------------------------------------------------------- xla


def grouped_swiglu(xs_TD, sizes_E, wg_EDF, wu_EDF, wd_EFD):
    """SwiGLU over rows already sorted into contiguous expert groups (``sizes_E`` rows each).

    Rows past ``sum(sizes_E)`` (dropped tokens) come out as 0. Output float32.
    """
    cdt = compute_dtype(xs_TD, wg_EDF)
    xs = xs_TD.astype(cdt)
    g = jax.lax.ragged_dot(xs, wg_EDF.astype(cdt), sizes_E, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, wu_EDF.astype(cdt), sizes_E, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(cdt)
    return jax.lax.ragged_dot(h, wd_EFD.astype(cdt), sizes_E, preferred_element_type=jnp.float32)


def xla_ffn_ragged(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD):
    """Sort by expert, three ``lax.ragged_dot`` grouped matmuls, unsort."""
    E = wg_EDF.shape[0]
    meta = grouping.sort_by_expert(expert_T, E)
    xs = permute_rows(x_TD, meta.order_T, meta.inv_T)
    ys = grouped_swiglu(xs, meta.sizes_E, wg_EDF, wu_EDF, wd_EFD)
    return permute_rows(ys, meta.inv_T, meta.order_T).astype(x_TD.dtype)


def xla_tile_rows(num_tokens: int, num_experts: int) -> int:
    """Row tile for the tile-loop strategy: ``min(T, clip(pow2_floor(T / E), 16, 128))``.

    Small tiles waste little compute on group padding (at most one partial tile per group);
    large tiles read each expert's weights fewer times. Chosen from a noisy CPU sweep
    (``python -m readme_jax.bench.expert_ffn --tm-sweep``; docs/KERNELS.md).
    """
    target = max(num_tokens // num_experts, 1)
    pow2 = 1 << (target.bit_length() - 1)
    return max(1, min(num_tokens, max(16, min(128, pow2))))


def xla_ffn_tiles(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD, *, tm: int | None = None):
    """Tile-padded sorted layout + a loop over the used tiles (``tiled_grouped_ffn``)."""
    T, E = x_TD.shape[0], wg_EDF.shape[0]
    tm = tm or xla_tile_rows(T, E)
    m = grouping.tile_layout(expert_T, E, tm)
    return tiled_grouped_ffn(x_TD, m.row_src_P, m.pos_T, m.tile_expert_N, m.num_tiles,
                             wg_EDF, wu_EDF, wd_EFD)


XLA_STRATEGIES = ("auto", "tiles", "ragged")


def xla_ffn(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD, *, strategy: str = "auto", tm: int | None = None):
    """The ``"xla"`` impl. ``strategy``:

    - ``"tiles"``: ``xla_ffn_tiles`` -- cost follows the tokens and the touched experts only.
    - ``"ragged"``: ``xla_ffn_ragged`` -- native grouped matmul on TPU; elsewhere XLA lowers
      ragged_dot densely over all E groups (about E dense FFNs).
    - ``"auto"``: ``"ragged"`` on TPU, ``"tiles"`` otherwise (why, with measurements: docs/KERNELS.md;
      ``python -m readme_jax.bench.expert_ffn`` remeasures).
    """
    if strategy not in XLA_STRATEGIES:
        raise ShapeError(f"expert_ffn: xla strategy must be one of {XLA_STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        strategy = "ragged" if jax.default_backend() == "tpu" else "tiles"
    if strategy == "ragged":
        return xla_ffn_ragged(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD)
    return xla_ffn_tiles(x_TD, expert_T, wg_EDF, wu_EDF, wd_EFD, tm=tm)


# --------------------------------------------------------------------------- xla: tile loop


def _swiglu_tile(xb, wg, wu, wd, cdt):
    g = jnp.dot(xb, wg, preferred_element_type=jnp.float32)
    u = jnp.dot(xb, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(cdt)
    return jnp.dot(h, wd, preferred_element_type=jnp.float32)


def _tiles_forward(x_NMD, tile_expert_N, num_tiles, wg, wu, wd):
    cdt = x_NMD.dtype

    def body(n, y):
        e = tile_expert_N[n]
        yb = _swiglu_tile(x_NMD[n], wg[e], wu[e], wd[e], cdt)
        return jax.lax.dynamic_update_index_in_dim(y, yb, n, 0)

    y0 = vary_like(jnp.zeros(x_NMD.shape[:2] + (wd.shape[2],), jnp.float32), x_NMD, tile_expert_N, wg, wu, wd)
    return jax.lax.fori_loop(0, num_tiles, body, y0)


def _tiles_backward(x_NMD, dy_NMD, tile_expert_N, num_tiles, wg, wu, wd):
    cdt = x_NMD.dtype

    def body(n, carry):
        dx, dwg, dwu, dwd = carry
        e = tile_expert_N[n]
        xb, dyb = x_NMD[n], dy_NMD[n].astype(cdt)
        g = jnp.dot(xb, wg[e], preferred_element_type=jnp.float32)
        u = jnp.dot(xb, wu[e], preferred_element_type=jnp.float32)
        s = jax.nn.sigmoid(g)
        h = (g * s * u).astype(cdt)
        dh = jnp.dot(dyb, wd[e].T, preferred_element_type=jnp.float32)
        dg = (dh * u * s * (1 + g * (1 - s))).astype(cdt)
        du = (dh * g * s).astype(cdt)
        dxb = (jnp.dot(dg, wg[e].T, preferred_element_type=jnp.float32)
               + jnp.dot(du, wu[e].T, preferred_element_type=jnp.float32))
        dx = jax.lax.dynamic_update_index_in_dim(dx, dxb, n, 0)
        dwg = dwg.at[e].add(jnp.dot(xb.T, dg, preferred_element_type=jnp.float32))
        dwu = dwu.at[e].add(jnp.dot(xb.T, du, preferred_element_type=jnp.float32))
        dwd = dwd.at[e].add(jnp.dot(h.T, dyb, preferred_element_type=jnp.float32))
        return dx, dwg, dwu, dwd

    f32 = jnp.float32
    refs = (x_NMD, dy_NMD, tile_expert_N, wg, wu, wd)
    init = tuple(vary_like(jnp.zeros(s, f32), *refs) for s in (x_NMD.shape, wg.shape, wu.shape, wd.shape))
    return jax.lax.fori_loop(0, num_tiles, body, init)


@jax.custom_vjp
def tiled_grouped_ffn(x_TD, row_src_P, pos_T, tile_expert_N, num_tiles, wg, wu, wd):
    """SwiGLU over a tile-padded layout (``kernels.grouping.tile_layout``), one expert per tile.

    Gathers tokens into tiles, loops over the used tiles (dynamic trip count: decode batches
    touching few experts read only those experts' weights), gathers rows back. Output in x's dtype.
    The backward is the same loop transposed; every permutation's transpose is a gather.
    """
    return _tiled_fwd(x_TD, row_src_P, pos_T, tile_expert_N, num_tiles, wg, wu, wd)[0]


def _tiled_fwd(x_TD, row_src_P, pos_T, tile_expert_N, num_tiles, wg, wu, wd):
    N, P = tile_expert_N.shape[0], row_src_P.shape[0]
    cdt = compute_dtype(x_TD, wg)
    x_NMD = jnp.take(x_TD.astype(cdt), row_src_P, axis=0, mode="fill", fill_value=0).reshape(N, P // N, -1)
    y_NMD = _tiles_forward(x_NMD, tile_expert_N, num_tiles, wg.astype(cdt), wu.astype(cdt), wd.astype(cdt))
    y = jnp.take(y_NMD.reshape(P, -1), pos_T, axis=0, mode="fill", fill_value=0).astype(x_TD.dtype)
    return y, (x_NMD, row_src_P, pos_T, tile_expert_N, num_tiles, wg, wu, wd)


def tiled_ffn_bwd(res, dy_TD):
    x_NMD, row_src_P, pos_T, tile_expert_N, num_tiles, wg, wu, wd = res
    cdt = x_NMD.dtype
    dy_NMD = jnp.take(dy_TD, row_src_P, axis=0, mode="fill", fill_value=0).reshape(x_NMD.shape[:2] + (-1,))
    dx_NMD, dwg, dwu, dwd = _tiles_backward(x_NMD, dy_NMD, tile_expert_N, num_tiles,
                                            wg.astype(cdt), wu.astype(cdt), wd.astype(cdt))
    dx = jnp.take(dx_NMD.reshape(row_src_P.shape[0], -1), pos_T, axis=0, mode="fill", fill_value=0)
    dx, dwg, dwu, dwd = (sum_to_vma(c, p) for c, p in ((dx, x_NMD), (dwg, wg), (dwu, wu), (dwd, wd)))
    return (dx.astype(dy_TD.dtype), None, None, None, None,
            dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype))


tiled_grouped_ffn.defvjp(_tiled_fwd, tiled_ffn_bwd)
