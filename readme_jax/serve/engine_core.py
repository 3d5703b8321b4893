"""The engine's model and configs, and its jitted step functions (pure; ``serve/engine.py`` drives them).

``make_step_fns(model, moe_ffn)`` builds ``(route_prompt, prefill, decode)``; ``step_fns`` caches
them per model, so engines over one ServeModel share compilations. Shapes and semantics are
described in ``serve/engine.py``'s module doc.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.config import ModelConfig
from readme_jax.errors import ConfigError
from readme_jax.model import decoder, sampling
from readme_jax.model.moe import routed_ffn, shared_ffn
from readme_jax.model.router import route_ids, router_logits
from readme_jax.ops.expert_ffn import expert_ffn

# ----------------------------------------------------------------------------- model and config


@dataclasses.dataclass(frozen=True, eq=False)
class ServeModel:
    """What the engine serves. Read-ME: ``router_*`` set, backbone FFN ``wg: [L,E,D,F_e]``.
    Dense: no router, ``wg: [L,D,F]``, ``n_experts = 1`` (every route is 0)."""

    cfg: ModelConfig
    params: dict
    n_experts: int = 1
    router_cfg: ModelConfig | None = None
    router_params: dict | None = None
    router_ffn: Callable = decoder.dense_ffn
    impl: str = "xla"
    name: str = "model"

    def __post_init__(self):
        wg = self.params.get("layers", {}).get("wg") if isinstance(self.params, Mapping) else None
        if wg is None:
            raise ConfigError(f"ServeModel {self.name!r}: params need layers.wg (decoder params layout)")
        L = self.cfg.n_layers
        if self.is_moe:
            if self.router_cfg is None:
                raise ConfigError(f"ServeModel {self.name!r}: router_params given without router_cfg")
            if wg.ndim != 4 or wg.shape[:2] != (L, self.n_experts) or wg.shape[2] != self.cfg.d_model:
                raise ConfigError(f"ServeModel {self.name!r}: MoE layers.wg must be [L={L}, E={self.n_experts}, "
                                  f"D={self.cfg.d_model}, F_e], got {tuple(wg.shape)}")
            head = self.router_params.get("head")
            if head is None or tuple(head.shape) != (self.router_cfg.d_model, self.n_experts):
                raise ConfigError(f"ServeModel {self.name!r}: router head must be [{self.router_cfg.d_model}, "
                                  f"{self.n_experts}], got {None if head is None else tuple(head.shape)}")
            if self.router_cfg.vocab_size != self.cfg.vocab_size:
                raise ConfigError(f"ServeModel {self.name!r}: router vocab {self.router_cfg.vocab_size} != "
                                  f"backbone vocab {self.cfg.vocab_size}")
        else:
            if self.n_experts != 1:
                raise ConfigError(f"ServeModel {self.name!r}: a dense model has n_experts=1, got {self.n_experts}")
            if wg.ndim != 3 or tuple(wg.shape) != (L, self.cfg.d_model, self.cfg.ffn_dim):
                raise ConfigError(f"ServeModel {self.name!r}: dense layers.wg must be [L, D, F] = "
                                  f"{(L, self.cfg.d_model, self.cfg.ffn_dim)}, got {tuple(wg.shape)}")

    @property
    def is_moe(self) -> bool:
        return self.router_params is not None

    @classmethod
    def from_readme(cls, router, backbone, name: str = "readme") -> "ServeModel":
        """From nnx modules: a ``Router`` and a ``MoEBackbone``."""
        if router.n_experts != backbone.n_experts:
            raise ConfigError(f"router has {router.n_experts} experts, backbone {backbone.n_experts}")
        return cls(backbone.cfg, backbone.arrays(), backbone.n_experts, router.cfg, router.arrays(),
                   router.ffn_fn(), backbone.impl, name)

    @classmethod
    def from_dense(cls, model, name: str = "dense") -> "ServeModel":
        """From a dense nnx ``Llama``."""
        return cls(model.cfg, model.arrays(), 1, name=name)

    def expert_bytes(self) -> int:
        """Bytes of one whole expert (its wg, wu, wd slices in every layer); the full FFN when dense."""
        lay = self.params["layers"]
        total = sum(int(np.prod(lay[k].shape)) * jnp.dtype(lay[k].dtype).itemsize for k in ("wg", "wu", "wd"))
        return total // self.n_experts  # the split layout's shared part is read by every step, not per expert



MOE_FFNS = ("present", "expert_ffn")


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
    moe_ffn: str = "present"  # present: only the batch's experts (present_experts_ffn) | expert_ffn (all, impl)
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
        if self.moe_ffn not in MOE_FFNS:
            raise ConfigError(f"engine.moe_ffn must be one of {MOE_FFNS}, got {self.moe_ffn!r}")
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


def present_experts_ffn(lp: dict, h_BTD, ctx):
    """Read-ME FFN over the experts PRESENT in the call: ``ctx = (route_BT, present_K)``.

    ``present_K`` lists the distinct expert ids of the call (K static, known on the host). For
    each, one ``expert_ffn`` over that expert's weights alone (a dynamic slice of the layer's
    stack) runs on every row and keeps its own rows; rows routed to -1 (padding) get 0. Only
    K experts' weights are read. On XLA:CPU this beats the tile loop of ``expert_ffn(impl='xla')``
    inside the layer scan by several times at decode batch sizes (docs/SERVING.md); the price is
    K x the FFN compute, small for decode batches.
    """
    route_BT, present_K = ctx
    B, T, D = h_BTD.shape
    x, r = h_BTD.reshape(B * T, D), route_BT.reshape(B * T)
    y = jnp.zeros((B * T, D), jnp.float32)
    for k in range(present_K.shape[0]):
        e = present_K[k]
        w = [lp[n][e][None] for n in ("wg", "wu", "wd")]
        y = y + expert_ffn(x, jnp.where(r == e, 0, -1), *w, impl="reference").astype(jnp.float32)
    return shared_ffn(lp, h_BTD, y.astype(h_BTD.dtype).reshape(B, T, D)), None


def _ffn_and_ctx(model: ServeModel, moe_ffn: str):
    """``(ffn, ctx_fn(route_BT, present_K))`` for ``decoder.forward``."""
    if not model.is_moe:
        return decoder.dense_ffn, lambda r, p: None
    if moe_ffn == "present":
        return present_experts_ffn, lambda r, p: (r, p)
    return routed_ffn(model.impl), lambda r, p: r


_STEP_FNS: "weakref.WeakKeyDictionary[ServeModel, dict]" = weakref.WeakKeyDictionary()


def step_fns(model: ServeModel, moe_ffn: str = "present") -> tuple:
    """The model's jitted functions, built once per (ServeModel, moe_ffn): engines share compilations."""
    per = _STEP_FNS.setdefault(model, {})
    if moe_ffn not in per:
        per[moe_ffn] = make_step_fns(model, moe_ffn)
    return per[moe_ffn]


def make_step_fns(model: ServeModel, moe_ffn: str = "present"):
    """``(route_prompt, prefill, decode)`` jitted functions of ``model`` (params passed in, not baked)."""
    cfg, rcfg, rffn, moe = model.cfg, model.router_cfg, model.router_ffn, model.is_moe
    ffn, ctx = _ffn_and_ctx(model, moe_ffn)

    def route_prompt(rparams, tokens_BT):
        rl, _ = router_logits(rparams, rcfg, tokens_BT, None, None, rffn)
        return route_ids(rl)

    def route_new(rparams, rcache, slots_B, tok_B, pos_B, window):
        """Router on each sampled token at its position (router cache rows gathered, column written)."""
        sub = _gather_rows(rcache, slots_B, window)
        rl, sub = router_logits(rparams, rcfg, tok_B[:, None], pos_B[:, None], sub, rffn)
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
        rsub = decoder.init_cache(rcfg, B, T + 1)
        rl, rsub = router_logits(rparams, rcfg, rt, rpos, rsub, rffn)
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
