"""One engine call per step: prefill chunks and decodes of many requests as one flat token list.

``flat_forward`` runs N tokens (any mix of requests) through a decoder. Token i belongs to
cache slot ``slot[i]`` at position ``pos[i]``. That slot's positions below ``ctx[i]`` are
already in the cache; the step's own tokens of one slot attend to each other causally. Each
token's keys are its slot's cache row (positions < ctx, window W) followed by the step's new
tokens (same slot, position <= its own). It uses the same :func:`layers.attend` as the rest
of the model, so a decode token sees exactly the keys the per-row decode path gives it. The
new keys/values come back per layer (``[L, N, K, hd]``) and are written to the cache once
after the call.

``make_mixed_fn(model)`` builds the jitted step: backbone over the step's tokens, logits and
sampling on one row per sampling item (a decode, or the last chunk of a prompt), then the
router on the step's prompt tokens (its cache rows) and on every sampled token (its route).
Compiled shapes: ``(N tokens, R sample rows, W window, greedy)``; the engine takes R from N,
so the programs number ``len(token buckets) x len(windows) x 2`` at most.

The Read-ME FFN here (``EngineConfig.mixed_ffn``) is one of two; in both, the experts read
are those present in the call, their number K is a runtime value (not a compiled shape), and
the shared part runs once on all tokens:

* ``grouped`` (default, :func:`experts_grouped_ffn`): the call's tokens are sorted by expert
  once (:func:`group_plan`, shared by every layer); each expert with tokens runs on ONE row tile
  of its contiguous group, the smallest of :data:`ROW_TILES` (then N) that holds it, chosen by
  ``lax.switch`` at run time. Rows computed: at most ``sum_e max(8, 4 * n_e)``, not K x N.
* ``cond`` (:func:`experts_cond_ffn`): each expert behind a ``lax.cond`` on "some token routes
  here", run on every row of the call and keeping its own (K x N rows): the earlier design,
  kept as the baseline ``bench.serving_latency --sweep-only`` measures the grouped one against.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp

from readme_jax.config import ModelConfig
from readme_jax.model import decoder, layers
from readme_jax.model.moe import cond_sum_experts, expert_rows, expert_weights, shared_ffn
from readme_jax.model.router import route_ids, router_ffn
from readme_jax.serve.engine.core import backbone_of, pick


def n_experts_of(params: dict, model) -> int:
    """Experts the routes of a call index: the pool's slots (expert store) or the model's experts."""
    pool = params["layers"].get("pool")
    return len(pool) if pool is not None else model.n_experts


def experts_cond_ffn(lp: dict, h_BTD, route_BT):
    """Read-ME FFN with a runtime number of experts: expert e runs (on every row, keeping its
    own) only when some token routes to it; rows routed to -1 get 0. Shared part once."""
    B, T, D = h_BTD.shape
    x, r = h_BTD.reshape(B * T, D), route_BT.reshape(B * T)
    y = cond_sum_experts(jnp.zeros((B * T, D), jnp.float32), x, r, enumerate(expert_weights(lp)))
    return shared_ffn(lp, h_BTD, y.astype(h_BTD.dtype).reshape(B, T, D)), None


ROW_TILES = (8, 32)  # row tiles an expert's group may run in (then the whole call, N rows)


def group_plan(route_N, n_experts: int):
    """``(order_N, starts_E, counts_E)``: the stable permutation that sorts tokens by expert
    (padding, route -1, last), where each expert's group starts in that order, and its size."""
    key = jnp.where(route_N < 0, n_experts, route_N)
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    return order.astype(jnp.int32), (jnp.cumsum(counts) - counts).astype(jnp.int32), counts


def experts_grouped_ffn(lp: dict, h_BTD, plan):
    """Read-ME FFN over the call's experts with tokens sorted by expert (``plan`` from
    :func:`group_plan`): expert e runs once, on the smallest row tile of :data:`ROW_TILES` (or
    all N rows) that holds its group, chosen at run time; experts with no token are skipped.
    Tile rows past the group belong to the next group (or are zero padding) and are masked
    to 0, so every token gets exactly its own expert's output; padding tokens get 0. Shared
    part once on all tokens."""
    order, starts, counts = plan
    B, T, D = h_BTD.shape
    N = B * T
    sizes = tuple(t for t in ROW_TILES if t < N) + (N,)
    x = h_BTD.reshape(N, D)[order]
    x = jnp.concatenate([x, jnp.zeros((sizes[-1], D), x.dtype)])  # a tile may start at any row
    y = jnp.zeros((N + sizes[-1], D), jnp.float32)
    for e, w in enumerate(expert_weights(lp)):
        def tile(y, rows, e=e, w=w):
            start, n = starts[e], counts[e]
            xt = jax.lax.dynamic_slice_in_dim(x, start, rows)
            yt = expert_rows(xt, jnp.where(jnp.arange(rows) < n, 0, -1), 0, *w)
            return jax.lax.dynamic_update_slice_in_dim(y, jax.lax.dynamic_slice_in_dim(y, start, rows) + yt, start, 0)

        branches = [lambda y: y] + [lambda y, rows=rows, tile=tile: tile(y, rows) for rows in sizes]
        pick = jnp.where(counts[e] == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, jnp.int32), counts[e]))
        y = jax.lax.switch(pick, branches, y)
    y = jnp.zeros((N, D), jnp.float32).at[order].set(y[:N])
    return shared_ffn(lp, h_BTD, y.astype(h_BTD.dtype).reshape(B, T, D)), None


def flat_forward(params: dict, cfg: ModelConfig, tokens_N, pos_N, slot_N, ctx_N, cache: decoder.KVCache,
                 window: int, *, ffn=decoder.dense_ffn, ffn_ctx=None):
    """``(hidden [N, D], new_k [L, N, K, hd], new_v)`` for N tokens of many requests (module doc).

    Padding tokens carry ``slot >= n_slots``: nobody attends to them and their columns are
    dropped when written back.
    """
    dt = jnp.dtype(cfg.dtype)
    N = tokens_N.shape[0]
    S = cache.k.shape[1]
    params = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    x = params["embed"][tokens_N][:, None]  # [N, 1, D]: every token is its own row of one query
    qpos = pos_N[:, None]
    cos, sin = layers.rope_cos_sin(qpos, cfg.head_dim, cfg.rope_theta, cfg.rope_llama3)
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    old_k = cache.k[:, :, :window].at[:, slot_N].get(mode="clip")  # [L, N, W, K, hd]
    old_v = cache.v[:, :, :window].at[:, slot_N].get(mode="clip")
    w = jnp.arange(window, dtype=jnp.int32)[None]
    kpos_old = jnp.where(w < ctx_N[:, None], w, -1)  # stale positions (>= ctx) are masked
    same = (slot_N[:, None] == slot_N[None, :]) & (slot_N[None, :] < S)
    kpos_new = jnp.where(same, pos_N[None, :], -1)
    kpos = jnp.concatenate([kpos_old, kpos_new], axis=1)  # [N, W + N]

    def layer(x_N1D, xs):
        lp, ok, ov = xs
        h = layers.rms_norm(x_N1D, lp["attn_norm"], cfg.norm_eps)
        q = layers.apply_rope((h @ lp["wq"]).reshape(N, 1, H, hd), cos, sin)
        k = layers.apply_rope((h @ lp["wk"]).reshape(N, 1, K, hd), cos, sin)
        v = (h @ lp["wv"]).reshape(N, 1, K, hd)
        kc = jnp.concatenate([ok.astype(k.dtype), jnp.broadcast_to(k[:, 0][None], (N, N, K, hd))], axis=1)
        vc = jnp.concatenate([ov.astype(v.dtype), jnp.broadcast_to(v[:, 0][None], (N, N, K, hd))], axis=1)
        a = layers.attend(q, kc, vc, qpos, kpos, cfg.attn_scale)
        x_N1D = x_N1D + (a @ lp["wo"]).astype(dt)
        h = layers.rms_norm(x_N1D, lp["ffn_norm"], cfg.norm_eps)
        y, _ = ffn(lp, h, ffn_ctx)
        return x_N1D + y.astype(dt), (k[:, 0], v[:, 0])

    x, (nk, nv) = jax.lax.scan(layer, x, (params["layers"], old_k, old_v))
    return layers.rms_norm(x, params["final_norm"], cfg.norm_eps)[:, 0], nk, nv


def write_columns(cache: decoder.KVCache, nk, nv, slot_N, pos_N) -> decoder.KVCache:
    """Write each token's new key/value at (its slot, its position); padding slots are dropped."""
    return decoder.KVCache(cache.k.at[:, slot_N, pos_N].set(nk.astype(cache.k.dtype), mode="drop"),
                           cache.v.at[:, slot_N, pos_N].set(nv.astype(cache.v.dtype), mode="drop"))


def make_mixed_fn(model, mixed_ffn: str = "grouped", ffn=None):
    """The jitted mixed step of ``model`` (a ReadMEModel or DenseModel), its Read-ME FFN
    ``mixed_ffn`` (``grouped`` or ``cond``, module doc); ``ffn``: a Read-ME FFN taking the routes
    ``[N, 1]`` instead (serve/placement.py's sharded one on a mesh).

    ``mixed(params, rparams, cache, rcache, tok_N, pos_N, slot_N, ctx_N, route_N, is_prompt_N,
    sample_R, rslot_R, rctx_R, seeds_R, counters_R, temps_R, top_ps_R, top_ks_R, *, greedy,
    window)`` returns ``(next_tokens_R, next_routes_R, cache, rcache)``. Row r samples from
    the logits of token ``sample_R[r]``; its sampled token sits at position ``pos + 1`` of slot
    ``rslot_R[r]`` (``>= n_slots`` for padding rows: nothing written), whose router cache held
    positions below ``rctx_R[r]`` before the step.
    """
    _, cfg = backbone_of(model)
    moe = model.is_moe
    rcfg, mlp = (model.router_cfg, model.router_mlp) if moe else (None, "swiglu")

    def mixed(params, rparams, cache, rcache, tok_N, pos_N, slot_N, ctx_N, route_N, is_prompt_N, sample_R, rslot_R,
              rctx_R, seeds_R, counters_R, temps_R, top_ps_R, top_ks_R, greedy, window):
        S = cache.k.shape[1]
        if not moe:
            ffn_, ctx = decoder.dense_ffn, None
        elif ffn is not None:
            ffn_, ctx = ffn, route_N[:, None]
        elif mixed_ffn == "grouped":
            ffn_, ctx = experts_grouped_ffn, group_plan(route_N, n_experts_of(params, model))
        else:
            ffn_, ctx = experts_cond_ffn, route_N[:, None]
        h, nk, nv = flat_forward(params, cfg, tok_N, pos_N, slot_N, ctx_N, cache, window, ffn=ffn_, ffn_ctx=ctx)
        logits = decoder.logits_of_hidden(params, cfg, h[sample_R])
        nxt = pick(logits, seeds_R, counters_R, temps_R, top_ps_R, top_ks_R, greedy)
        cache = write_columns(cache, nk, nv, slot_N, pos_N)
        if not moe:
            return nxt, jnp.zeros_like(nxt), cache, rcache
        # router: the step's prompt tokens (to fill its cache) and every sampled token (its route)
        r_tok = jnp.concatenate([tok_N, nxt])
        r_pos = jnp.concatenate([pos_N, pos_N[sample_R] + 1])
        r_slot = jnp.concatenate([jnp.where(is_prompt_N, slot_N, S), rslot_R])
        r_ctx = jnp.concatenate([ctx_N, rctx_R])
        rh, rk, rv = flat_forward(rparams, rcfg, r_tok, r_pos, r_slot, r_ctx, rcache, window, ffn=router_ffn(mlp))
        rl = jnp.dot(rh.astype(jnp.float32), rparams["head"].astype(jnp.float32))
        nroute = route_ids(rl[tok_N.shape[0]:])
        return nxt, nroute, cache, write_columns(rcache, rk, rv, r_slot, r_pos)

    return jax.jit(mixed, donate_argnums=(2, 3), static_argnames=("greedy", "window"))


_MIXED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def mixed_fn(model, mixed_ffn: str = "grouped", ffn=None):
    """The model's mixed step, built once per (model object, FFN) (engines over one model share
    compilations)."""
    fns = _MIXED.setdefault(model, {})
    if (mixed_ffn, ffn) not in fns:
        fns[(mixed_ffn, ffn)] = make_mixed_fn(model, mixed_ffn, ffn)
    return fns[(mixed_ffn, ffn)]
