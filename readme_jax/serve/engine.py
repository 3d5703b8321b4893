"""The JAX serving engine: jitted prefill and decode over slot-based KV caches, with route lookahead.

Contract (the scheduler drives it; see docs/SERVING.md, "The engine")::

    req = engine.new_request(rid, prompt_ids, max_new_tokens, arrival_s=t, sampling=SamplingParams())
        # validates (RequestError), routes the whole prompt with the router, returns a scheduler Request
    out = engine.step(batch)        # runs the batch's prefills and decodes, samples one token per item
    out.next_routes[rid]            # expert of the token just sampled (None: finished, EOS or max tokens)
    engine.output(rid)              # the generated token ids

A model is a :class:`ServeModel`: Read-ME (router + MoE backbone, plain param dicts) or a dense
Llama (one "expert", no router). Both run through ``decoder.forward``.

Caches: backbone ``[L, n_slots, max_len, K, hd]`` and router ``[Lr, n_slots, max_len, Kr, hdr]``;
slot s of a request holds its positions 0.. . The router runs on each sampled token right after
sampling, in the same jitted call, so the scheduler knows the expert of every queued token
before the backbone runs it. The backbone uses the routes the scheduler was given (prompt routes
from arrival, then each sampled token's), so what the scheduler planned is what runs.

* Prefill: the prompts of one length bucket run together (rows padded to a power of two,
  tokens to the bucket) into fresh bucket-long caches that are then written into the slots.
  Padding tokens get position ``>= bucket`` (their cache writes are dropped) and route ``-1``
  (the expert FFN drops them: no expert is touched for padding).
* Decode: one token per item; the items' cache rows are gathered, run, and only the new
  column is written back; the caches are donated.
* Sampling: greedy (temperature 0), temperature, top-p; each request has its own key
  ``fold_in(key(seed), token index)``, so what a request samples does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
import weakref
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.config import ModelConfig
from readme_jax.errors import ConfigError, ReadmeError, RequestError
from readme_jax.model import decoder, sampling
from readme_jax.model.moe import routed_ffn
from readme_jax.model.router import route_ids, router_logits
from readme_jax.ops.expert_ffn import expert_ffn
from readme_jax.serve.requests import Batch, Kind, Request

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
        return total // self.n_experts



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
    return y.astype(h_BTD.dtype).reshape(B, T, D), None


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


# ----------------------------------------------------------------------------- engine


@dataclasses.dataclass
class _ReqState:
    rid: int
    prompt: np.ndarray
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    tokens: list
    prompt_routes: np.ndarray
    routes: list  # routes[k]: the router's expert for tokens[k]
    slot: int | None = None
    pos: int = 0  # next backbone position (= tokens in the backbone cache)
    route: int | None = None  # route of tokens[-1]
    done: bool = False


class StepOutput(NamedTuple):
    next_routes: dict  # rid -> expert of the token just sampled, None when the request finished
    tokens: dict  # rid -> the token just sampled
    prefill_s: float  # measured: the step's prefill calls (host prep + device + readback)
    decode_s: float  # measured: the step's decode call


class Engine:
    """Slot-based engine over one :class:`ServeModel` (see the module doc for the contract).

    Times are measured wall clock. The first call of each compiled shape runs once untimed
    (``warm_start``; the calls are idempotent), so step times exclude compilation.
    """

    def __init__(self, model: ServeModel, cfg: EngineConfig = EngineConfig(), *, warm_start: bool = True):
        self.model = model
        self.cfg = cfg
        self.warm_start = warm_start
        self.buckets = cfg.buckets()
        self.max_prompt_len = min(self.buckets[-1], cfg.max_len - 1)
        self._route_prompt, self._prefill, self._decode = step_fns(model, cfg.moe_ffn)
        self._present = model.is_moe and cfg.moe_ffn == "present"
        self.params = jax.device_put(model.params)  # once: host (numpy) params would be copied every call
        self.rparams = jax.device_put(model.router_params)
        self._warm: set = set()
        self.compile_s = 0.0  # untimed first calls (compilation + one run)
        self.reset()

    # --- state
    def reset(self) -> None:
        """Empty every slot and forget every request (compiled functions are kept)."""
        m, c = self.model, self.cfg
        self.cache = decoder.init_cache(m.cfg, c.n_slots, c.max_len)
        self.rcache = decoder.init_cache(m.router_cfg, c.n_slots, c.max_len) if m.is_moe else None
        self._reqs: dict[int, _ReqState] = {}
        self._slot_owner: dict[int, int] = {}
        self.router_s = 0.0  # measured: prompt routing at arrival

    def output(self, rid: int) -> list[int]:
        """Tokens generated so far for ``rid``."""
        return list(self._get(rid).tokens)

    def routes(self, rid: int) -> np.ndarray:
        """Routes of the prompt and of every generated token so far (the last one included)."""
        st = self._get(rid)
        return np.concatenate([st.prompt_routes, np.asarray(st.routes, np.int32)]).astype(np.int32)

    def outputs(self) -> dict[int, list[int]]:
        return {rid: list(s.tokens) for rid, s in self._reqs.items()}

    def _get(self, rid: int) -> _ReqState:
        if rid not in self._reqs:
            raise RequestError(f"engine: unknown request id {rid}")
        return self._reqs[rid]

    # --- admission
    def check_request(self, rid: int, prompt_ids, max_new_tokens: int,
                      sampling_params: SamplingParams | None = None) -> np.ndarray:
        """Validate one request; returns the prompt as int32 or raises RequestError saying why."""
        where = f"request {rid}"
        sp = sampling_params or SamplingParams()
        if prompt_ids is None:
            raise RequestError(f"{where}: no prompt token ids")
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1:
            raise RequestError(f"{where}: prompt must be a 1-D sequence of token ids, got shape {ids.shape}")
        if ids.size == 0:
            raise RequestError(f"{where}: empty prompt (need at least 1 token)")
        if not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"{where}: prompt token ids must be integers, got dtype {ids.dtype}")
        if ids.size > self.max_prompt_len:
            raise RequestError(f"{where}: prompt has {ids.size} tokens > max prompt length {self.max_prompt_len} "
                               f"(engine max_len={self.cfg.max_len}, largest prefill bucket {self.buckets[-1]})")
        V = self.model.cfg.vocab_size
        bad = np.flatnonzero((ids < 0) | (ids >= V))
        if bad.size:
            raise RequestError(f"{where}: prompt token id {int(ids[bad[0]])} at index {int(bad[0])} is out of the "
                               f"vocabulary [0, {V}) ({bad.size} bad ids)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise RequestError(f"{where}: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if ids.size + int(max_new_tokens) > self.cfg.max_len:
            raise RequestError(f"{where}: prompt ({ids.size}) + max_new_tokens ({max_new_tokens}) = "
                               f"{ids.size + int(max_new_tokens)} > engine max_len={self.cfg.max_len}")
        t, p = sp.temperature, sp.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise RequestError(f"{where}: temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise RequestError(f"{where}: top_p must be in (0, 1], got {p!r}")
        if sp.seed is not None and (isinstance(sp.seed, bool) or not isinstance(sp.seed, (int, np.integer))
                                    or not 0 <= sp.seed < 2**31):
            raise RequestError(f"{where}: sampling seed must be an integer in [0, 2**31) or None, got {sp.seed!r}")
        if rid in self._reqs:
            raise RequestError(f"{where}: request id already used in this engine run")
        return ids.astype(np.int32)

    def route_prompt(self, prompt_ids) -> np.ndarray:
        """The router's expert for every prompt token (zeros for a dense model)."""
        ids = np.asarray(prompt_ids, np.int32)
        if not self.model.is_moe:
            return np.zeros(ids.shape, np.int32)
        T = self._bucket(ids.size)
        tok = np.zeros((1, T), np.int32)
        tok[0, :ids.size] = ids
        return np.asarray(self._route_prompt(self.rparams, tok))[0, :ids.size].astype(np.int32)

    def new_request(self, rid: int, prompt_ids, max_new_tokens: int, *, arrival_s: float = 0.0,
                    sampling_params: SamplingParams | None = None) -> Request:
        """Validate, route the prompt (timed into ``router_s``) and return the scheduler's Request."""
        sp = sampling_params or SamplingParams()
        ids = self.check_request(rid, prompt_ids, max_new_tokens, sp)
        if self.model.is_moe and self.warm_start:
            self._warmup(("route", self._bucket(ids.size)), lambda: self.route_prompt(ids))
        t0 = time.perf_counter()
        routes = self.route_prompt(ids)
        self.router_s += time.perf_counter() - t0
        req = Request(int(rid), float(arrival_s), routes, int(max_new_tokens), prompt_ids=ids)
        seed = int(rid) % 2**31 if sp.seed is None else int(sp.seed)
        self._reqs[int(rid)] = _ReqState(int(rid), ids, int(max_new_tokens), float(sp.temperature), float(sp.top_p),
                                         seed, [], routes, [])
        return req

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise RequestError(f"prompt of {n} tokens exceeds the largest prefill bucket {self.buckets[-1]}")

    def _warmup(self, key, fn) -> None:
        """Run ``fn`` once untimed the first time ``key`` (a compiled shape) is seen."""
        if not self.warm_start or key in self._warm:
            return
        self._warm.add(key)
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        self.compile_s += time.perf_counter() - t0

    # --- steps
    def step(self, batch: Batch) -> StepOutput:
        """Run one scheduler batch: every prefill and decode item, one sampled token each."""
        pre = [(it.request, it.slot) for it in batch.items if it.kind is Kind.PREFILL]
        dec = [(it.request, it.slot) for it in batch.items if it.kind is Kind.DECODE]
        out_tok: dict = {}
        out_route: dict = {}
        prefill_s = self._run_prefill(pre, out_tok, out_route) if pre else 0.0
        decode_s = self._run_decode(dec, out_tok, out_route) if dec else 0.0
        return StepOutput(out_route, out_tok, prefill_s, decode_s)

    def _state(self, req: Request) -> _ReqState:
        st = self._reqs.get(req.rid)
        if st is None:
            raise RequestError(f"engine: request {req.rid} was not created by this engine (use new_request)")
        if st.done:
            raise ReadmeError(f"engine: request {req.rid} already finished; it cannot run again")
        return st

    def _finish_token(self, st: _ReqState, tok: int, route: int, out_tok: dict, out_route: dict) -> None:
        st.tokens.append(tok)
        st.routes.append(route)
        out_tok[st.rid] = tok
        eos = self.cfg.eos_id is not None and tok == self.cfg.eos_id
        if eos or len(st.tokens) >= st.max_new_tokens:
            st.done = True
            self._slot_owner.pop(st.slot, None)
            out_route[st.rid] = None
        else:
            st.route = route
            out_route[st.rid] = route

    def _call(self, fn, key, args: tuple, greedy: bool, **static) -> tuple[np.ndarray, np.ndarray, float]:
        """Run a donating step function on the engine's caches: ``(tokens, routes, timed seconds)``.

        The first use of a shape is warmed untimed; that is safe because a call is idempotent
        (it rewrites the same cache entries with the same values).
        """
        def run():
            nxt, nroute, self.cache, self.rcache = fn(self.params, self.rparams, self.cache, self.rcache, *args,
                                                      greedy=greedy, **static)
            return nxt, nroute

        self._warmup(key + (greedy,), run)
        t0 = time.perf_counter()
        nxt, nroute = run()
        nxt, nroute = np.asarray(nxt), np.asarray(nroute)
        return nxt, nroute, time.perf_counter() - t0

    def _run_prefill(self, items: Sequence[tuple[Request, int]], out_tok: dict, out_route: dict) -> float:
        groups: dict[int, list] = {}
        for req, slot in items:
            st = self._state(req)
            if st.tokens or st.slot is not None:
                raise ReadmeError(f"engine: request {req.rid} is already prefilled (slot {st.slot})")
            if not 0 <= slot < self.cfg.n_slots:
                raise ReadmeError(f"engine: slot {slot} of request {req.rid} out of range [0, {self.cfg.n_slots})")
            if slot in self._slot_owner:
                raise ReadmeError(f"engine: slot {slot} is still held by request {self._slot_owner[slot]}")
            groups.setdefault(self._bucket(st.prompt.size), []).append((req, st, slot))
        if len({slot for _, slot in items}) != len(items):
            raise ReadmeError(f"engine: two prefills of one step share a slot: {[s for _, s in items]}")
        total = 0.0
        for T, group in sorted(groups.items()):
            t0 = time.perf_counter()
            B = self.cfg.rows(len(group))
            tok = np.zeros((B, T), np.int32)
            rts = np.full((B, T), -1, np.int32)  # padding tokens: no expert
            lens = np.ones((B,), np.int32)
            slots = np.full((B,), self.cfg.n_slots, np.int32)  # padding rows: out-of-range slot, dropped
            seeds = np.zeros((B,), np.int32)
            temps = np.zeros((B,), np.float32)
            tops = np.ones((B,), np.float32)
            for b, (req, st, slot) in enumerate(group):
                P = st.prompt.size
                tok[b, :P] = st.prompt
                rts[b, :P] = req.prompt_routes
                lens[b], slots[b], seeds[b], temps[b], tops[b] = P, slot, st.seed, st.temperature, st.top_p
            present = self._present_experts(rts)
            prep = time.perf_counter() - t0
            nxt, nroute, call_s = self._call(self._prefill, ("prefill", B, T, present.size),
                                             (slots, tok, rts, present, lens, seeds, temps, tops),
                                             bool((temps <= 0).all()))
            total += prep + call_s
            for b, (req, st, slot) in enumerate(group):
                st.slot, st.pos = slot, st.prompt.size
                self._slot_owner[slot] = st.rid
                self._finish_token(st, int(nxt[b]), int(nroute[b]), out_tok, out_route)
        return total

    def _run_decode(self, items: Sequence[tuple[Request, int]], out_tok: dict, out_route: dict) -> float:
        t0 = time.perf_counter()
        B = self.cfg.rows(len(items))
        slots = np.full((B,), self.cfg.n_slots, np.int32)  # padding rows: out-of-range slot, dropped
        tok = np.zeros((B,), np.int32)
        rts = np.full((B,), -1, np.int32)
        pos = np.full((B,), self.cfg.max_len, np.int32)
        seeds = np.zeros((B,), np.int32)
        counters = np.zeros((B,), np.int32)
        temps = np.zeros((B,), np.float32)
        tops = np.ones((B,), np.float32)
        states = []
        for b, (req, slot) in enumerate(items):
            st = self._state(req)
            if st.slot is None or st.slot != slot:
                raise ReadmeError(f"engine: decode of request {req.rid} in slot {slot}, but it was prefilled "
                                  f"into slot {st.slot}")
            if req.next_route is not None and req.next_route != st.route:
                raise ReadmeError(f"engine: scheduler has route {req.next_route} for request {req.rid}'s next "
                                  f"token, the engine routed it to {st.route}")
            slots[b], tok[b], rts[b], pos[b] = slot, st.tokens[-1], st.route, st.pos
            seeds[b], counters[b], temps[b], tops[b] = st.seed, len(st.tokens), st.temperature, st.top_p
            states.append(st)
        present = self._present_experts(rts)
        W = self.cfg.window(int(pos[:len(items)].max()))
        prep = time.perf_counter() - t0
        nxt, nroute, call_s = self._call(self._decode, ("decode", B, present.size, W),
                                         (slots, tok, rts, present, pos, seeds, counters, temps, tops),
                                         bool((temps <= 0).all()), window=W)
        for b, st in enumerate(states):
            st.pos += 1
            self._finish_token(st, int(nxt[b]), int(nroute[b]), out_tok, out_route)
        return prep + call_s

    def _present_experts(self, routes) -> np.ndarray:
        """Distinct real expert ids of a call (sorted), or a constant dummy when the path ignores them."""
        if not self._present:
            return np.zeros((1,), np.int32)
        r = np.asarray(routes).reshape(-1)
        return np.unique(r[r >= 0]).astype(np.int32)

    def benchmark_decode(self, routes, position: int, repeats: int = 5) -> np.ndarray:
        """Measured seconds of ``repeats`` greedy decode calls on synthetic rows (slots ``0..n-1``, one
        token each at ``position``, row b routed to ``routes[b]``). The caches are scratch: the
        engine is reset before and after."""
        routes = np.asarray(routes, np.int32).reshape(-1)
        n = routes.size
        if not 1 <= n <= self.cfg.n_slots:
            raise ConfigError(f"benchmark_decode: need 1..n_slots={self.cfg.n_slots} rows, got {n}")
        if not 0 <= position < self.cfg.max_len - 1:
            raise ConfigError(f"benchmark_decode: position must be in [0, max_len-1={self.cfg.max_len - 1}), "
                              f"got {position}")
        if routes.min() < 0 or routes.max() >= self.model.n_experts:
            raise ConfigError(f"benchmark_decode: routes must be in [0, {self.model.n_experts}), got {routes}")
        self.reset()
        B = self.cfg.rows(n)
        slots = np.full((B,), self.cfg.n_slots, np.int32)
        slots[:n] = np.arange(n)
        rts = np.full((B,), -1, np.int32)
        rts[:n] = routes
        pos = np.full((B,), self.cfg.max_len, np.int32)
        pos[:n] = position
        z = np.zeros((B,), np.int32)
        present = self._present_experts(rts)
        args = (slots, z, rts, present, pos, z, z, np.zeros((B,), np.float32), np.ones((B,), np.float32))
        W = self.cfg.window(position)
        out = np.array([self._call(self._decode, ("decode", B, present.size, W), args, True, window=W)[2]
                        for _ in range(repeats)])
        self.reset()
        return out


# ----------------------------------------------------------------------------- drivers


class EngineRunner:
    """Puts an :class:`Engine` behind ``serve.simulate`` (its ``runner``): real tokens and routes.

    A step's time is the engine's measured time (prefill + decode calls) plus the prompt routing
    done at arrivals since the previous step; with ``cost_model`` it is ``cost_model(batch)``
    instead (a virtual, deterministic clock for tests). ``steps`` keeps the measured parts.
    """

    def __init__(self, engine: Engine, sampling_params: SamplingParams | None = None, *,
                 cost_model: Callable[[Batch], float] | None = None, reset: bool = True):
        self.engine = engine
        self.sampling_params = sampling_params
        self.cost_model = cost_model
        if reset:
            engine.reset()
        self._router_s = 0.0
        self.steps: list[dict] = []

    def admit(self, spec) -> Request:
        r0 = self.engine.router_s
        try:
            return self.engine.new_request(spec.rid, spec.prompt_ids, spec.output_len, arrival_s=spec.arrival_s,
                                           sampling_params=self.sampling_params)
        finally:
            self._router_s += self.engine.router_s - r0

    def run(self, batch: Batch) -> tuple[float, dict]:
        out = self.engine.step(batch)
        rec = {"prefill_s": out.prefill_s, "decode_s": out.decode_s, "router_arrival_s": self._router_s,
               "n_prefill": len(batch.prefills), "n_decode": len(batch.decodes), "n_experts": len(batch.experts)}
        self.steps.append(rec)
        self._router_s = 0.0
        measured = rec["prefill_s"] + rec["decode_s"] + rec["router_arrival_s"]
        return (measured if self.cost_model is None else float(self.cost_model(batch))), out.next_routes


def generate(engine: Engine, prompts: Sequence, max_new_tokens: int | Sequence[int],
             sampling_params: SamplingParams | None = None, *, policy: str = "fcfs",
             token_budget: int | None = None) -> list[list[int]]:
    """Generate for several prompts through a scheduler (all arriving at time 0); returns the outputs."""
    from readme_jax.serve.scheduler import Scheduler, SchedulerConfig

    engine.reset()
    n = len(prompts)
    mx = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [int(max_new_tokens)] * n
    budget = token_budget or max(engine.max_prompt_len, engine.cfg.n_slots)
    sched = Scheduler(SchedulerConfig(policy=policy, token_budget=budget, n_slots=engine.cfg.n_slots,
                                      max_queue=max(n, 1), n_experts=engine.model.n_experts))
    for i, p in enumerate(prompts):
        if not sched.add(engine.new_request(i, p, mx[i], sampling_params=sampling_params)):
            raise RequestError(f"request {i}: rejected by the scheduler")
    while sched.has_work():
        batch = sched.next_batch()
        out = engine.step(batch)
        sched.on_step_done(batch, out.next_routes, 0.0)
    return [engine.output(i) for i in range(n)]
