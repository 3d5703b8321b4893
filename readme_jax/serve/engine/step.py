"""The engine's one jitted call per step: prompt chunks and decodes of many requests together.

``step_fn(model, ffn)`` builds (once per model object and FFN, so engines over one model share
compilations)::

    step(params, slots, rparams, cache, rcache, tokens_5N, rows_8B, rows_2B, *, window, n_tail, greedy, prompts)
        -> (next_token_B, next_route_B, cache, rcache)

* ``tokens_5N`` (int32): token id, position, row (-1: padding), route (expert slot, -1: none),
  is-prompt, for the N tokens laid out as serve/engine/attention.py describes;
* ``rows_8B`` (int32): per row its KV slot (>= n_slots: padding), backbone cache length ``ctx``,
  router cache length ``rctx``, index of its last token, whether it samples (a decode, or a
  prompt's last chunk), sampling seed, counter (tokens sampled so far) and top-k;
* ``rows_2B`` (float32): temperature and top-p.

The backbone runs the N tokens (:func:`ragged_forward`); each sampling row samples from its last
token's logits (row b's key is ``fold_in(key(seed), counter)``, so what a request samples does
not depend on its batch; ``greedy`` is a separately compiled variant without the sampler, its
argmax taken over vocabulary-major logits, :func:`greedy_tokens`). Then,
in the same call, the router runs on the step's prompt tokens (filling its cache; their routes
came at arrival) and on each sampled token at the next position: its route, the expert of the
next step. New keys and values are written into the donated caches.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp

from readme_jax.errors import ConfigError
from readme_jax.model import decoder, sampling
from readme_jax.model.moe import shared_ffn
from readme_jax.model.readme_model import DenseModel, ReadMEModel
from readme_jax.model.router import route_ids, router_ffn, router_logits
from readme_jax.serve.engine.experts import group_plan, grouped_experts
from readme_jax.serve.engine.forward import ragged_forward, write_cache

ServedModel = ReadMEModel | DenseModel  # Read-ME (router + MoE backbone) or its dense twin (n_experts = 1)


def backbone_of(model: ServedModel):
    """``(params, config)`` of the decoder that makes the tokens."""
    if isinstance(model, ReadMEModel):
        return model.backbone_params, model.backbone_cfg
    if isinstance(model, DenseModel):
        return model.params, model.cfg
    raise ConfigError(f"the engine serves a ReadMEModel or a DenseModel, got {type(model).__name__}")


def greedy_tokens(params: dict, cfg, h_BD):
    """The most likely token of each row. With a tied head the logits are formed vocabulary-major
    (``embed [V, D] . h``, then the argmax over V): on XLA:CPU the head's matmul then streams the
    embedding about 1.6x faster at 8 rows than ``h . embed^T`` does. The same numbers either way."""
    if not cfg.tie_embeddings:
        return jnp.argmax(decoder.logits_of_hidden(params, cfg, h_BD), axis=-1).astype(jnp.int32)
    e = params["embed"]
    logits_VB = jax.lax.dot_general(e, h_BD.astype(e.dtype), (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    return jnp.argmax(logits_VB, axis=0).astype(jnp.int32)


def sample_rows(logits_BV, seeds_B, counters_B, temps_B, top_ps_B, top_ks_B):
    """One token per row; row b uses key ``fold_in(key(seeds[b]), counters[b])`` (batch-invariant)."""
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def stochastic():
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_B, counters_B)
        one = lambda lg, k, t, p, tk: sampling.sample(lg[None], k, t[None], p[None], tk[None])[0]  # noqa: E731
        return jax.vmap(one)(logits_BV, keys, temps_B, top_ps_B, top_ks_B)

    return jax.lax.cond(jnp.all(temps_B <= 0), lambda: greedy, stochastic)


def make_step(model: ServedModel, ffn=None):
    """The jitted step of ``model`` (module doc). ``ffn``: a Read-ME FFN ``(layer_params, h_ND, route_N)
    -> y_ND`` over the layer's expert stacks (the mesh's sharded one, serve/engine/placement.py);
    None: the expert slots of ``step``'s ``slots`` argument (serve/engine/experts.py)."""
    _, cfg = backbone_of(model)
    moe = model.is_moe
    rcfg, mlp = (model.router_cfg, model.router_mlp) if moe else (None, "swiglu")

    def step(params, slots, rparams, cache, rcache, tokens_5N, rows_8B, rows_2B, window, n_tail, greedy, prompts):
        tok, pos, row, route, is_prompt = tokens_5N
        slot, ctx, rctx, last, samples, seeds, counters, top_ks = rows_8B
        temps, top_ps = rows_2B
        B = slot.shape[0]
        S = cache.k.shape[1]
        real = row >= 0
        if not moe:
            layer_ffn = lambda lp, li, h: decoder.dense_ffn(lp, h, None)[0]  # noqa: E731
        elif ffn is not None:
            layer_ffn = lambda lp, li, h: ffn(lp, h, route)  # noqa: E731
        else:
            plan = group_plan(route, len(slots))
            layer_ffn = lambda lp, li, h: shared_ffn(lp, h, grouped_experts(h, plan, slots, li))  # noqa: E731
        h, nk, nv = ragged_forward(params, cfg, tok, pos, row, real, slot, ctx, cache, window, n_tail, layer_ffn)
        if greedy:
            nxt = greedy_tokens(params, cfg, h[last])
        else:
            nxt = sample_rows(decoder.logits_of_hidden(params, cfg, h[last]), seeds, counters, temps, top_ps, top_ks)
        cache = write_cache(cache, nk, nv, jnp.where(real, slot[jnp.maximum(row, 0)], S), pos)
        if not moe:
            return nxt, jnp.zeros_like(nxt), cache, rcache
        # router: each sampled token (aligned, at its row's next position), then the step's prompt tokens
        samp = samples > 0
        r_row = jnp.where(samp, jnp.arange(B, dtype=jnp.int32), -1)
        r_tok, r_pos, r_ok = nxt, pos[last] + 1, samp
        if prompts:  # fill the router cache at the prompt tokens (decode tokens are in it already)
            p_row = jnp.where(is_prompt > 0, row, -1)
            r_tok, r_pos = jnp.concatenate([r_tok, tok]), jnp.concatenate([r_pos, pos])
            r_row, r_ok = jnp.concatenate([r_row, p_row]), jnp.concatenate([r_ok, p_row >= 0])
        rh, rk, rv = ragged_forward(rparams, rcfg, r_tok, r_pos, r_row, r_ok, slot, rctx, rcache, window, n_tail,
                                    lambda lp, li, h: router_ffn(mlp)(lp, h, None)[0])
        nroute = route_ids(jnp.dot(rh[:B].astype(jnp.float32), rparams["head"].astype(jnp.float32)))
        rcache = write_cache(rcache, rk, rv, jnp.where(r_ok, slot[jnp.maximum(r_row, 0)], S), r_pos)
        return nxt, nroute, cache, rcache

    return jax.jit(step, donate_argnums=(3, 4), static_argnames=("window", "n_tail", "greedy", "prompts"))


_STEPS: "weakref.WeakKeyDictionary[ServedModel, dict]" = weakref.WeakKeyDictionary()


def step_fn(model: ServedModel, ffn=None):
    """The model's jitted step, built once per (model object, ffn): engines over one model share compilations."""
    per = _STEPS.setdefault(model, {})
    if ffn not in per:
        per[ffn] = make_step(model, ffn)
    return per[ffn]



_ROUTERS: "weakref.WeakKeyDictionary[ReadMEModel, object]" = weakref.WeakKeyDictionary()


def route_prompt_fn(model: ReadMEModel):
    """Jitted ``(router params, tokens [1, T]) -> routes [1, T]``: the expert of every prompt token,
    the router run over the whole prompt at arrival (no cache); built once per model object."""
    if model not in _ROUTERS:
        cfg, mlp = model.router_cfg, model.router_mlp
        _ROUTERS[model] = jax.jit(lambda rparams, tok: route_ids(router_logits(rparams, cfg, tok, None, None, mlp=mlp)[0]))
    return _ROUTERS[model]
