"""Ragged attention of one engine step: each row's cache is read once, however many tokens it has.

A step runs N tokens of B rows (a row is one request's KV slot in this step). The engine lays the
tokens out so that no token needs its own copy of its row's cache (serve/engine/layout.py):

* **aligned slots** ``0 .. B-1``: slot b holds row b's first token of the step (or padding);
* **tail slots** ``B .. N-1``: the further tokens of rows that run several (prompt chunks),
  contiguous per row;
* **tail rows**: the last ``n_tail`` rows are those whose tail tokens need the cache (a prompt's
  later chunk: its earlier chunks are in the cache). A first chunk's tail tokens need none.

A token at position p of row b attends to row b's cache positions ``< ctx[b]`` (its window of W
positions, gathered once per row: ``kc [B, W, K, hd]``) and to the step's own keys of row b at
positions ``<= p``. Aligned tokens score against their own row only (B x W); tail tokens against
the ``n_tail`` tail rows (masked to their own); so a decode-only step (N = B) costs exactly one row
per token, and a step with no later chunks reads the cache only for its aligned tokens. Every
token also sees its own key, so padding tokens (row -1) get finite values and touch nothing.
This is the ragged/paged-attention idea (vLLM; JAX's TPU ragged paged attention) in plain XLA:
one gather of the rows, no per-token copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = jnp.finfo(jnp.float32).min


def ragged_attention(q_NHh, k_NKh, v_NKh, kc_BWKh, vc_BWKh, pos_N, row_N, key_ok_N, ctx_B, *, n_tail: int,
                     scale: float | None = None):
    """Attention output ``[N, H*hd]`` of the step's tokens (module doc for the layout).

    ``row_N``: the token's row (-1: padding); ``key_ok_N``: whether its key is visible to the
    other tokens of its row (False for padding, and for tokens whose key is already cached);
    ``ctx_B``: cache positions each row has before the step (0 for padding rows).
    """
    N, H, hd = q_NHh.shape
    B, W, K, _ = kc_BWKh.shape
    G = H // K
    scale = hd**-0.5 if scale is None else scale
    f32 = jnp.float32
    q = q_NHh.reshape(N, K, G, hd)
    cache_ok_BW = jnp.arange(W, dtype=jnp.int32)[None] < ctx_B[:, None]
    # aligned tokens: their own row's cache
    s_a = jnp.einsum("bkgd,bwkd->bkgw", q[:B], kc_BWKh, preferred_element_type=f32) * scale
    s_a = jnp.where(cache_ok_BW[:, None, None], s_a, NEG)
    if N == B:  # every row has one token: the step's own keys reduce to each token's own
        s_self = jnp.einsum("bkgd,bkd->bkg", q, k_NKh, preferred_element_type=f32)[..., None] * scale
        p_a, p_self = _softmax((s_a, s_self))
        o = (jnp.einsum("bkgw,bwkd->bkgd", p_a.astype(vc_BWKh.dtype), vc_BWKh, preferred_element_type=f32)
             + p_self * v_NKh[:, :, None].astype(f32))
        return o.reshape(N, H * hd).astype(q_NHh.dtype)
    # the step's own keys: same row, visible, not after the query; always the token itself
    same = (row_N[:, None] == row_N[None, :]) & (row_N[:, None] >= 0) & key_ok_N[None, :]
    new_ok = (same & (pos_N[None, :] <= pos_N[:, None])) | jnp.eye(N, dtype=bool)
    s_n = jnp.einsum("nkgd,mkd->nkgm", q, k_NKh, preferred_element_type=f32) * scale
    s_n = jnp.where(new_ok[:, None, None], s_n, NEG)
    vn = v_NKh.astype(f32)
    p_a, p_na = _softmax((s_a, s_n[:B]))
    o_a = (jnp.einsum("bkgw,bwkd->bkgd", p_a.astype(vc_BWKh.dtype), vc_BWKh, preferred_element_type=f32)
           + jnp.einsum("bkgm,mkd->bkgd", p_na, vn))
    if n_tail:  # tail tokens: the tail rows' caches, each token keeping its own row's
        lo = B - n_tail
        s_t = jnp.einsum("nkgd,bwkd->nkgbw", q[B:], kc_BWKh[lo:], preferred_element_type=f32) * scale
        own = row_N[B:, None] == jnp.arange(lo, B, dtype=jnp.int32)[None]  # [N-B, n_tail]
        ok_t = own[:, :, None] & cache_ok_BW[lo:][None]
        s_t = jnp.where(ok_t[:, None, None], s_t, NEG).reshape(N - B, K, G, n_tail * W)
        p_t, p_nt = _softmax((s_t, s_n[B:]))
        vt = vc_BWKh[lo:].reshape(n_tail * W, K, hd)
        o_t = (jnp.einsum("nkgs,skd->nkgd", p_t.astype(vt.dtype), vt, preferred_element_type=f32)
               + jnp.einsum("nkgm,mkd->nkgd", p_nt, vn))
    else:
        (p_nt,) = _softmax((s_n[B:],))
        o_t = jnp.einsum("nkgm,mkd->nkgd", p_nt, vn)
    return jnp.concatenate([o_a, o_t]).reshape(N, H * hd).astype(q_NHh.dtype)


def _softmax(parts: tuple) -> tuple:
    """A softmax over the last axes of several score blocks together (masked entries are NEG)."""
    m = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in parts]), axis=0)[..., None]
    e = [jnp.exp(s - m) for s in parts]
    z = sum(jnp.sum(x, axis=-1) for x in e)[..., None]
    return tuple(x / z for x in e)

