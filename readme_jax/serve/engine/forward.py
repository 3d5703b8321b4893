"""The decoder over one step's flat token list (backbone or router), with the ragged attention.

``ragged_forward`` runs N tokens of B rows (serve/engine/attention.py has the layout) through a
decoder in the ``decoder.forward`` param layout. Row b's cache rows (positions below the window W)
are gathered once per layer; the new keys and values come back per layer (``[L, N, K, hd]``) and
are written to the cache after the step (:func:`write_cache`). The FFN is a hook
``ffn(layer_params, layer_index, h_ND) -> y_ND``; the layer index lets a Read-ME FFN read its
experts' slices inside their branches (serve/engine/experts.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from readme_jax.config import ModelConfig
from readme_jax.model import decoder, layers
from readme_jax.serve.engine.attention import ragged_attention

Ffn = Callable[[dict, jax.Array, jax.Array], jax.Array]


def ragged_forward(params: dict, cfg: ModelConfig, tok_N, pos_N, row_N, key_ok_N, slot_B, ctx_B,
                   cache: decoder.KVCache, window: int, n_tail: int, ffn: Ffn):
    """``(hidden [N, D] after the final norm, new_k [L, N, K, hd], new_v)``.

    ``params["layers"]`` holds what the layer scan slices (attention, norms, a dense or shared
    FFN); a Read-ME FFN brings its experts itself. ``slot_B`` >= n_slots marks a padding row.
    """
    dt = jnp.dtype(cfg.dtype)
    N = tok_N.shape[0]
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    S = cache.k.shape[1]
    slot_c = jnp.minimum(slot_B, S - 1)  # padding rows read some slot; their ctx is 0, so nothing is seen
    x = params["embed"][tok_N].astype(dt)
    cos, sin = layers.rope_cos_sin(pos_N[:, None], hd, cfg.rope_theta, cfg.rope_llama3)  # [N, 1, hd]

    def layer(x_ND, lp, li):
        lp = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, lp)
        h = layers.rms_norm(x_ND, lp["attn_norm"], cfg.norm_eps)
        q = layers.apply_rope((h @ lp["wq"]).reshape(N, 1, H, hd), cos, sin)[:, 0]
        k = layers.apply_rope((h @ lp["wk"]).reshape(N, 1, K, hd), cos, sin)[:, 0]
        v = (h @ lp["wv"]).reshape(N, K, hd)
        kc = cache.k[li, slot_c, :window]  # [B, W, K, hd]: each row's cache, read once
        vc = cache.v[li, slot_c, :window]
        a = ragged_attention(q, k.astype(kc.dtype), v.astype(vc.dtype), kc, vc, pos_N, row_N, key_ok_N, ctx_B,
                             n_tail=n_tail, scale=cfg.attn_scale)
        x_ND = x_ND + (a @ lp["wo"]).astype(dt)
        h = layers.rms_norm(x_ND, lp["ffn_norm"], cfg.norm_eps)
        with jax.named_scope("ffn"):
            y = ffn(lp, li, h)
        return x_ND + y.astype(dt), (k, v)

    if cfg.n_layers == 1:  # the router: no scan, so its weights are read in place (a scan slice copies them)
        lp = jax.tree.map(lambda a: a.reshape(a.shape[1:]), params["layers"])
        x, (k, v) = layer(x, lp, jnp.int32(0))
        nk, nv = k[None], v[None]
    else:
        def body(x_ND, xs):
            with jax.named_scope("decoder_layer"):
                return layer(x_ND, *xs)

        x, (nk, nv) = jax.lax.scan(body, x, (params["layers"], jnp.arange(cfg.n_layers, dtype=jnp.int32)))
    return layers.rms_norm(x, params["final_norm"], cfg.norm_eps), nk, nv


def write_cache(cache: decoder.KVCache, nk_LNKh, nv_LNKh, slot_N, pos_N) -> decoder.KVCache:
    """Each token's new key/value at (its slot, its position); slots >= n_slots are dropped."""
    return decoder.KVCache(cache.k.at[:, slot_N, pos_N].set(nk_LNKh.astype(cache.k.dtype), mode="drop"),
                           cache.v.at[:, slot_N, pos_N].set(nv_LNKh.astype(cache.v.dtype), mode="drop"))
