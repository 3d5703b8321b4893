"""The engine's jitted step functions (pure; ``serve/engine.py`` drives them; configs in config/serve.py).

The engine serves a :class:`ReadMEModel` or a :class:`DenseModel` (its A/B twin).
``make_step_fns(model, moe_ffn, impl)`` builds ``(route_prompt, prefill, decode)``; ``step_fns``
caches them per model object, so engines over one model share compilations. Shapes and semantics are
described in ``serve/engine.py``'s module doc.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.config import ModelConfig
from readme_jax.errors import ConfigError
from readme_jax.model import decoder, sampling
from readme_jax.model.moe import pool_ffn, present_experts_ffn, routed_ffn
from readme_jax.model.readme_model import DenseModel, ReadMEModel
from readme_jax.model.router import route_ids, router_logits

# ----------------------------------------------------------------------------- the model served

ServedModel = ReadMEModel | DenseModel  # Read-ME (router + MoE backbone) or its dense twin (n_experts = 1)


def backbone_of(model: ServedModel) -> tuple[dict, ModelConfig]:
    """``(params, config)`` of the decoder that makes the tokens."""
    if isinstance(model, ReadMEModel):
        return model.backbone_params, model.backbone_cfg
    if isinstance(model, DenseModel):
        return model.params, model.cfg
    raise ConfigError(f"the engine serves a ReadMEModel or a DenseModel, got {type(model).__name__}")




# ----------------------------------------------------------------------------- jitted math


def pick(logits_BV, seeds_B, counters_B, temps_B, top_ps_B, top_ks_B, greedy: bool):
    """The sampled token per row; ``greedy`` (static) is a separate compiled variant that skips the sampler."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return sample_rows(logits_BV, seeds_B, counters_B, temps_B, top_ps_B, top_ks_B)


def sample_rows(logits_BV, seeds_B, counters_B, temps_B, top_ps_B, top_ks_B):
    """One token per row; row b uses key ``fold_in(key(seeds[b]), counters[b])`` (batch-invariant)."""
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def stochastic():
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_B, counters_B)
        one = lambda lg, k, t, p, tk: sampling.sample(lg[None], k, t[None], p[None], tk[None])[0]  # noqa: E731
        return jax.vmap(one)(logits_BV, keys, temps_B, top_ps_B, top_ks_B)

    return jax.lax.cond(jnp.all(temps_B <= 0), lambda: greedy, stochastic)


def _gather_rows(cache: decoder.KVCache, slots_B, window: int | None = None) -> decoder.KVCache:
    """Rows ``slots_B`` of the cache, positions ``[0, window)`` only (all when None)."""
    k, v = (cache.k, cache.v) if window is None else (cache.k[:, :, :window], cache.v[:, :, :window])
    return decoder.KVCache(k.at[:, slots_B].get(mode="clip"), v.at[:, slots_B].get(mode="clip"))


def _put_column(cache: decoder.KVCache, sub: decoder.KVCache, slots_B, pos_B) -> decoder.KVCache:
    """Write row b's position ``pos[b]`` of ``sub`` into slot ``slots[b]`` (out-of-range slots dropped)."""
    b = jnp.arange(slots_B.shape[0])
    p = jnp.minimum(pos_B, sub.k.shape[2] - 1)
    return decoder.KVCache(cache.k.at[:, slots_B, pos_B].set(sub.k[:, b, p], mode="drop"),
                           cache.v.at[:, slots_B, pos_B].set(sub.v[:, b, p], mode="drop"))


def _put_prefix(cache: decoder.KVCache, sub: decoder.KVCache, slots_B) -> decoder.KVCache:
    """Write ``sub`` ([L, B, T, ...]) into positions ``0..T-1`` of each row's slot."""
    T = sub.k.shape[2]
    return decoder.KVCache(cache.k.at[:, slots_B, :T].set(sub.k, mode="drop"),
                           cache.v.at[:, slots_B, :T].set(sub.v, mode="drop"))


def _ffn_and_ctx(model: ServedModel, moe_ffn: str, impl: str, ffn=None):
    """``(ffn, ctx_fn(route_BT, present_K))`` for ``decoder.forward``; ``ffn`` given: it (on a mesh)."""
    if not model.is_moe:
        return decoder.dense_ffn, lambda r, p: None
    if ffn is not None:  # serve/placement.py's sharded FFN: ctx = (route, present_K), present_K unused
        return ffn, lambda r, p: (r, p)
    if moe_ffn == "present":
        return present_experts_ffn, lambda r, p: (r, p)
    if moe_ffn == "pool":  # expert store: routes index the call's expert buffers (params["layers"]["pool"])
        return pool_ffn, lambda r, p: r
    return routed_ffn(impl), lambda r, p: r


_STEP_FNS: "weakref.WeakKeyDictionary[ServedModel, dict]" = weakref.WeakKeyDictionary()


def step_fns(model: ServedModel, moe_ffn: str = "present", impl: str = "xla", ffn=None) -> tuple:
    """The model's jitted functions, built once per (model object, moe_ffn, impl, ffn): engines share compilations."""
    per = _STEP_FNS.setdefault(model, {})
    if (moe_ffn, impl, ffn) not in per:
        per[moe_ffn, impl, ffn] = make_step_fns(model, moe_ffn, impl, ffn)
    return per[moe_ffn, impl, ffn]


def make_step_fns(model: ServedModel, moe_ffn: str = "present", impl: str = "xla", ffn=None):
    """``(route_prompt, prefill, decode)`` jitted functions of ``model`` (params passed in, not baked).
    ``ffn``: the Read-ME FFN to use instead of ``moe_ffn``'s (the sharded one on a mesh)."""
    _, cfg = backbone_of(model)
    moe = model.is_moe
    router_cfg, mlp = (model.router_cfg, model.router_mlp) if moe else (None, "swiglu")
    ffn, ctx = _ffn_and_ctx(model, moe_ffn, impl, ffn)

    def route_prompt(rparams, tokens_BT):
        rl, _ = router_logits(rparams, router_cfg, tokens_BT, None, None, mlp=mlp)
        return route_ids(rl)

    def route_new(rparams, rcache, slots_B, tok_B, pos_B, window):
        """Router on each sampled token at its position (router cache rows gathered, column written)."""
        sub = _gather_rows(rcache, slots_B, window)
        rl, sub = router_logits(rparams, router_cfg, tok_B[:, None], pos_B[:, None], sub, mlp=mlp)
        return route_ids(rl)[:, 0], _put_column(rcache, sub, slots_B, pos_B)

    def prefill(params, rparams, cache, rcache, slots_B, tokens_BT, routes_BT, present_K, lens_B, seeds_B, temps_B,
                top_ps_B, top_ks_B, greedy):
        B, T = tokens_BT.shape
        t = jnp.arange(T, dtype=jnp.int32)[None]
        pos = jnp.where(t < lens_B[:, None], t, T)  # padding -> position T: dropped from the bucket cache
        sub = decoder.init_cache(cfg, B, T)
        h, sub, _ = decoder.forward(params, cfg, tokens_BT, pos, sub, ffn=ffn, ffn_ctx=ctx(routes_BT, present_K),
                                    logits=False)
        last = jnp.take_along_axis(h, (lens_B - 1)[:, None, None], axis=1)[:, 0]
        logits = decoder.logits_of_hidden(params, cfg, last)
        nxt = pick(logits, seeds_B, jnp.zeros_like(seeds_B), temps_B, top_ps_B, top_ks_B, greedy)
        cache = _put_prefix(cache, sub, slots_B)
        if not moe:
            return nxt, jnp.zeros_like(nxt), cache, rcache
        # router over prompt + the sampled token (T + 1 columns): fills its cache rows 0..len
        rt = jnp.concatenate([tokens_BT, jnp.zeros((B, 1), tokens_BT.dtype)], axis=1)
        rt = rt.at[jnp.arange(B), lens_B].set(nxt)
        t1 = jnp.arange(T + 1, dtype=jnp.int32)[None]
        rpos = jnp.where(t1 <= lens_B[:, None], t1, T + 1)
        rsub = decoder.init_cache(router_cfg, B, T + 1)
        rl, rsub = router_logits(rparams, router_cfg, rt, rpos, rsub, mlp=mlp)
        nroute = route_ids(jnp.take_along_axis(rl, lens_B[:, None, None], axis=1))[:, 0]
        return nxt, nroute, cache, _put_prefix(rcache, rsub, slots_B)

    def decode(params, rparams, cache, rcache, slots_B, tokens_B, routes_B, present_K, pos_B, seeds_B, counters_B,
               temps_B, top_ps_B, top_ks_B, greedy, window):
        sub = _gather_rows(cache, slots_B, window)  # attend over positions < window only
        h, sub, _ = decoder.forward(params, cfg, tokens_B[:, None], pos_B[:, None], sub, ffn=ffn,
                                    ffn_ctx=ctx(routes_B[:, None], present_K), logits=False)
        logits = decoder.logits_of_hidden(params, cfg, h[:, 0])
        nxt = pick(logits, seeds_B, counters_B, temps_B, top_ps_B, top_ks_B, greedy)
        cache = _put_column(cache, sub, slots_B, pos_B)
        if not moe:
            return nxt, jnp.zeros_like(nxt), cache, rcache
        nroute, rcache = route_new(rparams, rcache, slots_B, nxt, pos_B + 1, window)
        return nxt, nroute, cache, rcache

    return (jax.jit(route_prompt), jax.jit(prefill, donate_argnums=(2, 3), static_argnames=("greedy",)),
            jax.jit(decode, donate_argnums=(2, 3), static_argnames=("greedy", "window")))
