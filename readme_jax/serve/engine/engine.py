"""The JAX serving engine: jitted prefill and decode over slot-based KV caches, with route lookahead.

Contract (the scheduler drives it; see docs/SERVING.md, "The JAX engine")::

    req = engine.new_request(rid, prompt_ids, max_new_tokens, arrival_s=t, sampling_params=SamplingParams())
        # validates (RequestError), routes the whole prompt with the router, returns a scheduler Request
    out = engine.step(batch)        # runs the batch's prefills and decodes, samples one token per item
    out.next_routes[rid]            # expert of the token just sampled (None: finished, EOS or max tokens)
    engine.output(rid)              # the generated token ids

A model is a :class:`ReadMEModel` (router + MoE backbone) or a :class:`DenseModel` (one "expert", no
router). Both run through ``decoder.forward``.

Caches: backbone ``[L, n_slots, max_len, K, hd]`` and router ``[Lr, n_slots, max_len, Kr, hdr]``;
slot s of a request holds its positions 0.. . The router runs on each sampled token right after
sampling, in the same jitted call, so the scheduler knows the expert of every queued token
before the backbone runs it. The backbone uses the routes the scheduler was given (prompt routes
from arrival, then each sampled token's), so what the scheduler planned is what runs.

* Prefill: the prompts of one length bucket run together (rows padded to a row bucket,
  tokens to the bucket) into fresh bucket-long caches that are then written into the slots.
  Padding tokens get position ``>= bucket`` (their cache writes are dropped) and route ``-1``
  (the expert FFN drops them: no expert is touched for padding).
* Decode: one token per item; the items' cache rows (positions below a window bucket) are
  gathered, run, and only the new column is written back; the caches are donated.
* MoE FFN: by default only the experts present in the call are computed and read
  (:func:`present_experts_ffn`); ``moe_ffn="expert_ffn"`` uses ``ops.expert_ffn`` on all.
* Expert store (``Engine(model, cfg, store=ExpertStore(...))``, serve/expert_store.py): the
  experts' own weights stay in host memory and at most ``store.capacity`` are on the device.
  A step is cut into calls of at most that many experts (one fewer when prefetching; resident
  first, ``cache_policy.split_calls``); each call gets its experts' buffers (``moe.pool_ffn``), the
  wait for their copies is measured (``StepOutput.stall_s``), and while it computes the store
  may start copying the next call's experts (the rest of the step, then ``engine.lookahead()``,
  e.g. the scheduler's queued work). A prompt whose tokens span more experts than the pool
  holds runs with the extra experts copied for that call only (``store.stats.transient_loads``).
* On a mesh (``EngineConfig.mesh``, serve/placement.py): the experts are sharded over the
  mesh's ``expert`` axis and run through a ``shard_map`` FFN (one all-reduce per layer, no weight
  moves); params and caches are placed at construction, outputs equal the one-device engine's.
* Sampling: greedy (temperature 0), temperature, top-p; each request has its own key
  ``fold_in(key(seed), token index)``, so what a request samples does not depend on its batch.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import numpy as np

from readme_jax.config import EngineConfig, SamplingParams
from readme_jax.errors import ConfigError, ReadmeError, RequestError
from readme_jax.model import decoder
from readme_jax.serve.scheduling.cache_policy import split_calls
from readme_jax.serve.engine.core import ServedModel, backbone_of, make_step_fns, sample_rows, step_fns
from readme_jax.serve.engine.expert_store import ExpertStore
from readme_jax.serve.engine.flat import mixed_fn
from readme_jax.serve.engine.mixed_step import MixedStep
from readme_jax.serve.engine.placement import engine_placement
from readme_jax.serve.scheduling.requests import Batch, Kind, Request, StepOutput
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig

__all__ = ["Engine", "EngineConfig", "EngineRunner", "SamplingParams", "ServedModel", "StepOutput",
           "complete", "generate", "make_step_fns", "sample_rows", "step_fns"]

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
    top_k: int = 0
    pos: int = 0  # next backbone position (= tokens in the backbone cache)
    route: int | None = None  # route of tokens[-1]
    done: bool = False


class Engine(MixedStep):
    """Slot-based engine over one model, Read-ME or dense (see the module doc for the contract).

    Times are measured wall clock. The first call of each compiled shape runs once untimed
    (``warm_start``; the calls are idempotent), so step times exclude compilation.
    """

    def __init__(self, model: ServedModel, cfg: EngineConfig = EngineConfig(), *, warm_start: bool = True,
                 store: ExpertStore | None = None):
        params, self.backbone_cfg = backbone_of(model)
        model.validate()
        self.model = model
        self.cfg = cfg
        self.warm_start = warm_start
        self.buckets = cfg.buckets()
        self.max_prompt_len = min(self.buckets[-1], cfg.max_len - 1)
        self.store = store
        self.lookahead: Callable[[], Sequence] | None = None  # known future expert sets (prefetch, Belady)
        self._future: list = []
        self.placement = pl = engine_placement(model, cfg, store)  # None: one device (serve/placement.py)
        if store is not None:
            if not model.is_moe or store.n_experts != model.n_experts:
                raise ConfigError("engine: the expert store must be built from the Read-ME model it serves")
            self._route_prompt, self._prefill, self._decode = step_fns(model, "pool", cfg.impl)
            self.params = store.base_params  # the experts' own weights come from the store per call
        elif pl is not None:  # experts sharded over the mesh, the rest replicated
            self._route_prompt, self._prefill, self._decode = step_fns(model, cfg.moe_ffn, cfg.impl, ffn=pl.ffn)
            self.params = pl.backbone(params)
        else:
            self._route_prompt, self._prefill, self._decode = step_fns(model, cfg.moe_ffn, cfg.impl)
            self.params = jax.device_put(params)  # once: host (numpy) params would be copied every call
        self._present = model.is_moe and cfg.moe_ffn == "present" and pl is None
        if cfg.mixed_step:
            self._mixed = mixed_fn(model, cfg.mixed_ffn, ffn=pl.ffn if pl is not None else None)
        put = jax.device_put if pl is None else pl.replicate
        self.rparams = put(model.router_params) if model.is_moe else None
        self._warm: set = set()
        self.compile_s = 0.0  # untimed first calls (compilation + one run)
        self.reset()

    # --- state
    def reset(self) -> None:
        """Empty every slot and forget every request (compiled functions are kept)."""
        m, c = self.model, self.cfg
        self.cache = decoder.init_cache(self.backbone_cfg, c.n_slots, c.max_len)
        self.rcache = decoder.init_cache(m.router_cfg, c.n_slots, c.max_len) if m.is_moe else None
        if self.placement is not None:  # on a mesh: the caches are replicated
            self.cache, self.rcache = self.placement.replicate((self.cache, self.rcache))
        self._reqs: dict[int, _ReqState] = {}
        self._slot_owner: dict[int, int] = {}
        self.router_s = 0.0  # measured: prompt routing at arrival

    def output(self, rid: int) -> list[int]:
        """Tokens generated so far for ``rid``."""
        return list(self._request_state(rid).tokens)

    def routes(self, rid: int) -> np.ndarray:
        """Routes of the prompt and of every generated token so far (the last one included)."""
        st = self._request_state(rid)
        return np.concatenate([st.prompt_routes, np.asarray(st.routes, np.int32)]).astype(np.int32)

    def release(self, rid: int) -> None:
        """Forget request ``rid`` (finished or cancelled): its slot is free for the next prefill, its
        state is dropped (a long-running server would otherwise keep every request's tokens)."""
        st = self._reqs.pop(int(rid), None)
        if st is not None and st.slot is not None and self._slot_owner.get(st.slot) == st.rid:
            del self._slot_owner[st.slot]

    def outputs(self) -> dict[int, list[int]]:
        return {rid: list(s.tokens) for rid, s in self._reqs.items()}

    def _request_state(self, rid: int) -> _ReqState:
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
        V = self.backbone_cfg.vocab_size
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
        if isinstance(sp.top_k, bool) or not isinstance(sp.top_k, (int, np.integer)) or sp.top_k < 0:
            raise RequestError(f"{where}: top_k must be an integer >= 0 (0 = no limit), got {sp.top_k!r}")
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
                                         seed, [], routes, [], top_k=int(sp.top_k))
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
        if self.cfg.mixed_step:
            return self._step_mixed(batch)
        pre = [(it.request, it.slot) for it in batch.items if it.kind is Kind.PREFILL]
        dec = [(it.request, it.slot) for it in batch.items if it.kind is Kind.DECODE]
        out_tok: dict = {}
        out_route: dict = {}
        calls = [("prefill", T, g) for T, g in self._prefill_groups(pre)] if pre else []
        if dec:
            calls += [("decode", None, d) for d in self._decode_groups(dec)]
        sets = [self._call_experts(kind, g) for kind, _, g in calls]
        known = self._known_future()
        times = {"prefill": 0.0, "decode": 0.0}
        stall0 = self.store.stats.stall_s if self.store is not None else 0.0
        for i, (kind, T, group) in enumerate(calls):
            self._future = [frozenset(x) for x in sets[i + 1:]] + known
            if kind == "prefill":
                times[kind] += self._prefill_call(T, group, out_tok, out_route)
            else:
                times[kind] += self._decode_call(group, out_tok, out_route)
        stall = (self.store.stats.stall_s - stall0) if self.store is not None else 0.0
        return StepOutput(out_route, out_tok, times["prefill"], times["decode"], stall, frozenset().union(*sets))

    def _known_future(self) -> list:
        """The expert sets of the work queued after this step (``lookahead()``), for the store's
        prefetch and Belady; empty when nothing uses it (the lookahead is a scheduler dry run)."""
        uses = self.store is not None and self.store.uses_future and self.lookahead is not None
        return list(self.lookahead()) if uses else []

    def _call_experts(self, kind: str, group) -> frozenset:
        if kind == "prefill":
            return frozenset(int(e) for _, st, _ in group for e in st.prompt_routes)
        return frozenset(int(self._state(req).route) for req, _ in group)

    def _decode_groups(self, items) -> list:
        """Decode items as calls: one call, or (expert store) calls of at most ``capacity`` experts."""
        if self.store is None:
            return [list(items)]
        by_expert: dict = {}
        for req, slot in items:
            by_expert.setdefault(int(self._state(req).route), []).append((req, slot))
        calls = split_calls(by_expert, self.store.resident, self.store.max_call_experts)
        return [[it for e in call for it in by_expert[e]] for call in calls]

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

    def _run_compiled(self, fn, key, args: tuple, greedy: bool, experts: tuple = (), pool_size: int | None = None,
                      params: dict | None = None, **static) -> tuple[np.ndarray, np.ndarray, float]:
        """Run a donating step function on the engine's caches: ``(tokens, routes, timed seconds)``.

        The first use of a shape is warmed untimed; that is safe because a call is idempotent
        (it rewrites the same cache entries with the same values). With an expert store, the
        call's experts are acquired first (the wait is the store's stall, not in the returned
        seconds) and the next call's copies start while this one computes. ``pool_size`` pads the
        call's buffers to that many (the mixed step's fixed pool shape); ``params`` (warm-up) runs
        on the given params, the store untouched.
        """
        store = self.store if params is None else None
        params = self.params if params is None else params
        if store is not None:
            bufs = store.acquire(experts, self._future)
            if pool_size:
                bufs = tuple(bufs) + (bufs[0],) * (pool_size - len(bufs))
            params = {**params, "layers": {**params["layers"], "pool": bufs}}

        def run(prefetch: bool = False):
            nxt, nroute, self.cache, self.rcache = fn(params, self.rparams, self.cache, self.rcache, *args,
                                                      greedy=greedy, **static)
            if prefetch and store is not None:
                store.prefetch(self._future, busy=experts)
            return nxt, nroute

        self._warmup(key + (greedy,), run)
        t0 = time.perf_counter()
        nxt, nroute = run(prefetch=True)
        nxt, nroute = np.asarray(nxt), np.asarray(nroute)
        return nxt, nroute, time.perf_counter() - t0

    def _prefill_groups(self, items: Sequence[tuple[Request, int]]) -> list:
        """Validated prefills as calls ``(bucket, [(req, state, slot)])``: one per length bucket, cut
        (expert store) so a call's experts fit the pool where its prompts allow."""
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
        out = []
        for T, group in sorted(groups.items()):
            if self.store is None:
                out.append((T, group))
                continue
            cur, cur_e = [], set()
            for g in group:  # first fit in arrival order; a prompt over capacity runs alone
                e = {int(x) for x in g[1].prompt_routes}
                if cur and len(cur_e | e) > self.store.max_call_experts:
                    out.append((T, cur))
                    cur, cur_e = [], set()
                cur.append(g)
                cur_e |= e
            out.append((T, cur))
        return out

    def _prefill_call(self, T: int, group: list, out_tok: dict, out_route: dict) -> float:
        t0 = time.perf_counter()
        B = self.cfg.rows(len(group))
        tok = np.zeros((B, T), np.int32)
        rts = np.full((B, T), -1, np.int32)  # padding tokens: no expert
        lens = np.ones((B,), np.int32)
        slots = np.full((B,), self.cfg.n_slots, np.int32)  # padding rows: out-of-range slot, dropped
        seeds = np.zeros((B,), np.int32)
        temps = np.zeros((B,), np.float32)
        tops = np.ones((B,), np.float32)
        top_ks = np.zeros((B,), np.int32)
        for b, (req, st, slot) in enumerate(group):
            P = st.prompt.size
            tok[b, :P] = st.prompt
            rts[b, :P] = req.prompt_routes
            lens[b], slots[b], seeds[b], temps[b], tops[b] = P, slot, st.seed, st.temperature, st.top_p
            top_ks[b] = st.top_k
        rts, present, experts = self._expert_args(rts)
        prep = time.perf_counter() - t0
        nxt, nroute, call_s = self._run_compiled(self._prefill, ("prefill", B, T, present.size),
                                         (slots, tok, rts, present, lens, seeds, temps, tops, top_ks),
                                         bool((temps <= 0).all()), experts=experts)
        for b, (req, st, slot) in enumerate(group):
            st.slot, st.pos = slot, st.prompt.size
            self._slot_owner[slot] = st.rid
            self._finish_token(st, int(nxt[b]), int(nroute[b]), out_tok, out_route)
        return prep + call_s

    @staticmethod
    def _check_decode(st: _ReqState, req: Request, slot: int) -> None:
        """A decode runs in the slot its request was prefilled into, on the route the engine gave it."""
        if st.slot is None or st.slot != slot or not st.tokens:
            raise ReadmeError(f"engine: decode of request {req.rid} in slot {slot}, but it was prefilled "
                              f"into slot {st.slot}")
        if req.next_route is not None and req.next_route != st.route:
            raise ReadmeError(f"engine: scheduler has route {req.next_route} for request {req.rid}'s next "
                              f"token, the engine routed it to {st.route}")

    def _decode_call(self, items: Sequence[tuple[Request, int]], out_tok: dict, out_route: dict) -> float:
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
        top_ks = np.zeros((B,), np.int32)
        states = []
        for b, (req, slot) in enumerate(items):
            st = self._state(req)
            self._check_decode(st, req, slot)
            slots[b], tok[b], rts[b], pos[b] = slot, st.tokens[-1], st.route, st.pos
            seeds[b], counters[b], temps[b], tops[b] = st.seed, len(st.tokens), st.temperature, st.top_p
            top_ks[b] = st.top_k
            states.append(st)
        rts, present, experts = self._expert_args(rts)
        W = self.cfg.window(int(pos[:len(items)].max()))
        prep = time.perf_counter() - t0
        nxt, nroute, call_s = self._run_compiled(self._decode, ("decode", B, present.size, W),
                                         (slots, tok, rts, present, pos, seeds, counters, temps, tops, top_ks),
                                         bool((temps <= 0).all()), window=W, experts=experts)
        for b, st in enumerate(states):
            st.pos += 1
            self._finish_token(st, int(nxt[b]), int(nroute[b]), out_tok, out_route)
        return prep + call_s

    def _expert_args(self, routes) -> tuple[np.ndarray, np.ndarray, tuple]:
        """``(routes, present_K, experts)`` for a call: with an expert store the routes become
        indices into the call's expert buffers (``experts``, ascending) and ``present_K`` their count."""
        if self.store is None:
            return routes, self._present_experts(routes), ()
        r = np.asarray(routes, np.int32)
        experts = np.unique(r[r >= 0]).astype(np.int32)
        local = np.where(r >= 0, np.searchsorted(experts, np.maximum(r, 0)), -1).astype(np.int32)
        return local, np.arange(experts.size, dtype=np.int32), tuple(int(e) for e in experts)

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
        args = (slots, z, rts, present, pos, z, z, np.zeros((B,), np.float32), np.ones((B,), np.float32), z)
        W = self.cfg.window(position)
        out = np.array([self._run_compiled(self._decode, ("decode", B, present.size, W), args, True, window=W)[2]
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
        rec = {"prefill_s": out.prefill_s, "decode_s": out.decode_s, "stall_s": out.stall_s,
               "router_arrival_s": self._router_s,
               "n_prefill": len(batch.prefills), "n_decode": len(batch.decodes), "n_experts": len(batch.experts)}
        self.steps.append(rec)
        self._router_s = 0.0
        measured = rec["prefill_s"] + rec["decode_s"] + rec["stall_s"] + rec["router_arrival_s"]
        return (measured if self.cost_model is None else float(self.cost_model(batch))), out.next_routes


def generate(engine: Engine, prompts: Sequence, max_new_tokens: int | Sequence[int],
             sampling_params: SamplingParams | None = None, *, policy: str = "fcfs",
             token_budget: int | None = None) -> list[list[int]]:
    """Generate for several prompts through a scheduler (all arriving at time 0); returns the outputs."""
    engine.reset()
    n = len(prompts)
    mx = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [int(max_new_tokens)] * n
    budget = token_budget or max(engine.max_prompt_len, engine.cfg.n_slots)
    sched = Scheduler(SchedulerConfig(policy=policy, token_budget=budget, n_slots=engine.cfg.n_slots,
                                      max_queue=max(n, 1), n_experts=engine.model.n_experts,
                                      chunked_prefill=engine.cfg.mixed_step))
    for i, p in enumerate(prompts):
        if not sched.add(engine.new_request(i, p, mx[i], sampling_params=sampling_params)):
            raise RequestError(f"request {i}: rejected by the scheduler")
    while sched.has_work():
        batch = sched.next_batch()
        out = engine.step(batch)
        sched.on_step_done(batch, out.next_routes, 0.0)
    return [engine.output(i) for i in range(n)]


def greedy_batch(model: ServedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 eos_id: int | None, n_slots: int = 16) -> list[list[int]]:
    """Greedy continuations of many prompts (each ends with ``eos_id`` when the model closed it) on one engine
    sized to them, ``n_slots`` at a time: the main job's chat answers (chat_data, chat_eval)."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    cfg = EngineConfig(n_slots=n_slots, max_len=longest + max_new_tokens + 1, eos_id=eos_id)
    return generate(Engine(model, cfg, warm_start=False), [list(p) for p in prompts], max_new_tokens)


def complete(model: ServedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, eos_id: int | None = None,
             sampling_params: SamplingParams | None = None) -> list[int]:
    """One prompt's continuation (greedy by default) on a one-slot engine sized to it; the new token ids."""
    n = len(prompt_ids)
    if n < 1 or max_new_tokens < 1:
        raise RequestError(f"complete: needs a non-empty prompt and max_new_tokens >= 1, got {n} and {max_new_tokens}")
    cfg = EngineConfig(n_slots=1, max_len=n + max_new_tokens + 1, prefill_buckets=(n,), row_buckets=(1,),
                       eos_id=eos_id)
    return generate(Engine(model, cfg, warm_start=False), [list(prompt_ids)], max_new_tokens, sampling_params)[0]
