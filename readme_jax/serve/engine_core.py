"""The engine's configs and its jitted step functions (pure; ``serve/engine.py`` drives them).

The engine serves a :class:`ReadMEModel` or a :class:`DenseModel` (its A/B twin).
``make_step_fns(model, moe_ffn, impl)`` builds ``(route_prompt, prefill, decode)``; ``step_fns``
caches them per model object, so engines over one model share compilations. Shapes and semantics are
described in ``serve/engine.py``'s module doc.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.config import Impl, ModelConfig, MoeFfn, check_choices
from readme_jax.errors import ConfigError
from readme_jax.model import decoder, sampling
from readme_jax.model.moe import present_experts_ffn, routed_ffn
from readme_jax.model.readme_model import DenseModel, ReadMEModel
from readme_jax.model.router import route_ids, router_logits

# ----------------------------------------------------------------------------- config

ServedModel = ReadMEModel | DenseModel  # Read-ME (router + MoE backbone) or its dense twin (n_experts = 1)


def backbone_of(model: ServedModel) -> tuple[dict, ModelConfig]:
    """``(params, config)`` of the decoder that makes the tokens."""
    if isinstance(model, ReadMEModel):
        return model.backbone_params, model.backbone_cfg
    if isinstance(model, DenseModel):
        return model.params, model.cfg
    raise ConfigError(f"the engine serves a ReadMEModel or a DenseModel, got {type(model).__name__}")




@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """KV slots and compile buckets. A request needs ``prompt_len + max_new_tokens <= max_len``
    and ``prompt_len <= max(prefill_buckets)``; ``prefill_buckets`` None: 8, 16, 32, ... up to
    ``max_len - 1``."""

    n_slots: int = 8
    max_len: int = 256
    prefill_buckets: tuple[int, ...] | None = None
    row_buckets: tuple[int, ...] | None = None  # rows per call; None: 1, 2, 4, ... n_slots
    eos_id: int | None = None
    moe_ffn: MoeFfn = "present"  # present: only the batch's experts (present_experts_ffn) | expert_ffn (all, impl)
    impl: Impl = "xla"  # expert_ffn implementation when moe_ffn = expert_ffn
    decode_windows: tuple[int, ...] | None = None  # decode attends over the smallest window > positions + 1

    def __post_init__(self):
        if self.n_slots < 1:
            raise ConfigError(f"engine.n_slots must be >= 1, got {self.n_slots}")
        if self.max_len < 2:
            raise ConfigError(f"engine.max_len must be >= 2, got {self.max_len}")
        if self.prefill_buckets is not None:
            b = tuple(self.prefill_buckets)
            if not b or any(int(x) != x or not 1 <= x <= self.max_len - 1 for x in b):
                raise ConfigError(f"engine.prefill_buckets must be integers in [1, max_len-1={self.max_len - 1}], "
                                  f"got {b}")
        if self.row_buckets is not None:
            r = tuple(self.row_buckets)
            if not r or any(int(x) != x or not 1 <= x <= self.n_slots for x in r) or max(r) != self.n_slots:
                raise ConfigError(f"engine.row_buckets must be integers in [1, n_slots={self.n_slots}] including "
                                  f"n_slots, got {r}")
        if self.decode_windows is not None and any(int(w) != w or not 2 <= w <= self.max_len
                                                   for w in self.decode_windows):
            raise ConfigError(f"engine.decode_windows must be integers in [2, max_len={self.max_len}], "
                              f"got {self.decode_windows}")
        check_choices(self, "engine.")
        if self.eos_id is not None and self.eos_id < 0:
            raise ConfigError(f"engine.eos_id must be >= 0 or null, got {self.eos_id}")

    def buckets(self) -> tuple[int, ...]:
        if self.prefill_buckets is not None:
            return tuple(sorted({int(x) for x in self.prefill_buckets}))
        out, b = [], 8
        while b < self.max_len - 1:
            out.append(b)
            b *= 2
        out.append(self.max_len - 1)
        return tuple(sorted(set(out)))

    def window(self, max_pos: int) -> int:
        """Cache positions a decode reads when its rows sit at positions <= ``max_pos`` (the router
        writes ``max_pos + 1``): the smallest decode window > ``max_pos + 1``, else ``max_len``."""
        for w in sorted(self.decode_windows or ()):
            if w >= max_pos + 2:
                return int(w)
        return self.max_len

    def rows(self, n: int) -> int:
        """Rows a call with ``n`` items runs (the smallest row bucket >= n)."""
        if self.row_buckets is None:
            return min(self.n_slots, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
        return min(b for b in self.row_buckets if b >= n)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 = greedy; ``top_p`` in (0, 1]; ``seed`` None = the request id."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


# ----------------------------------------------------------------------------- jitted math


def sample_rows(logits_BV, seeds_B, counters_B, temps_B, top_ps_B):
    """One token per row; row b uses key ``fold_in(key(seeds[b]), counters[b])`` (batch-invariant)."""
    greedy = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def stochastic():
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds_B, counters_B)
        one = lambda lg, k, t, p: sampling.sample(lg[None], k, t[None], p[None])[0]  # noqa: E731
        return jax.vmap(one)(logits_BV, keys, temps_B, top_ps_B)

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


def _ffn_and_ctx(model: ServedModel, moe_ffn: str, impl: str):
    """``(ffn, ctx_fn(route_BT, present_K))`` for ``decoder.forward``."""
    if not model.is_moe:
        return decoder.dense_ffn, lambda r, p: None
    if moe_ffn == "present":
        return present_experts_ffn, lambda r, p: (r, p)
    return routed_ffn(impl), lambda r, p: r


_STEP_FNS: "weakref.WeakKeyDictionary[ServedModel, dict]" = weakref.WeakKeyDictionary()


def step_fns(model: ServedModel, moe_ffn: str = "present", impl: str = "xla") -> tuple:
    """The model's jitted functions, built once per (model object, moe_ffn, impl): engines share compilations."""
    per = _STEP_FNS.setdefault(model, {})
    if (moe_ffn, impl) not in per:
        per[moe_ffn, impl] = make_step_fns(model, moe_ffn, impl)
    return per[moe_ffn, impl]


def make_step_fns(model: ServedModel, moe_ffn: str = "present", impl: str = "xla"):
    """``(route_prompt, prefill, decode)`` jitted functions of ``model`` (params passed in, not baked)."""
    _, cfg = backbone_of(model)
    moe = model.is_moe
    router_cfg, mlp = (model.router_cfg, model.router_mlp) if moe else (None, "swiglu")
    ffn, ctx = _ffn_and_ctx(model, moe_ffn, impl)

    def route_prompt(rparams, tokens_BT):
        rl, _ = router_logits(rparams, router_cfg, tokens_BT, None, None, mlp=mlp)
        return route_ids(rl)

    def route_new(rparams, rcache, slots_B, tok_B, pos_B, window):
        """Router on each sampled token at its position (router cache rows gathered, column written)."""
        sub = _gather_rows(rcache, slots_B, window)
        rl, sub = router_logits(rparams, router_cfg, tok_B[:, None], pos_B[:, None], sub, mlp=mlp)
        return route_ids(rl)[:, 0], _put_column(rcache, sub, slots_B, pos_B)

    def pick(logits_BV, seeds_B, counters_B, temps_B, top_ps_B, greedy):
        if greedy:  # a separate compiled variant: all-greedy batches skip the sampler
            return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        return sample_rows(logits_BV, seeds_B, counters_B, temps_B, top_ps_B)

    def prefill(params, rparams, cache, rcache, slots_B, tokens_BT, routes_BT, present_K, lens_B, seeds_B, temps_B,
                top_ps_B, greedy):
        B, T = tokens_BT.shape
        t = jnp.arange(T, dtype=jnp.int32)[None]
        pos = jnp.where(t < lens_B[:, None], t, T)  # padding -> position T: dropped from the bucket cache
        sub = decoder.init_cache(cfg, B, T)
        h, sub, _ = decoder.forward(params, cfg, tokens_BT, pos, sub, ffn=ffn, ffn_ctx=ctx(routes_BT, present_K),
                                    logits=False)
        last = jnp.take_along_axis(h, (lens_B - 1)[:, None, None], axis=1)[:, 0]
        logits = decoder.logits_of_hidden(params, cfg, last)
        nxt = pick(logits, seeds_B, jnp.zeros_like(seeds_B), temps_B, top_ps_B, greedy)
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
               temps_B, top_ps_B, greedy, window):
        sub = _gather_rows(cache, slots_B, window)  # attend over positions < window only
        h, sub, _ = decoder.forward(params, cfg, tokens_B[:, None], pos_B[:, None], sub, ffn=ffn,
                                    ffn_ctx=ctx(routes_B[:, None], present_K), logits=False)
        logits = decoder.logits_of_hidden(params, cfg, h[:, 0])
        nxt = pick(logits, seeds_B, counters_B, temps_B, top_ps_B, greedy)
        cache = _put_column(cache, sub, slots_B, pos_B)
        if not moe:
            return nxt, jnp.zeros_like(nxt), cache, rcache
        nroute, rcache = route_new(rparams, rcache, slots_B, nxt, pos_B + 1, window)
        return nxt, nroute, cache, rcache

    return (jax.jit(route_prompt), jax.jit(prefill, donate_argnums=(2, 3), static_argnames=("greedy",)),
            jax.jit(decode, donate_argnums=(2, 3), static_argnames=("greedy", "window")))
