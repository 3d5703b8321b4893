"""The JAX serving engine: KV slots, route lookahead and ONE jitted call per scheduler step.

Contract (the scheduler drives it; docs/SERVING.md, "The engine")::

    req = engine.new_request(rid, prompt_ids, max_new_tokens, arrival_s=t, sampling_params=SamplingParams())
        # validates (RequestError), routes the whole prompt with the router, returns a scheduler Request
    out = engine.step(batch)        # runs the batch's prompt chunks and decodes, one token per finished item
    out.next_routes[rid]            # expert of the token just sampled (None: finished, EOS or max tokens)
    engine.output(rid)              # the generated token ids

A model is a :class:`ReadMEModel` (router + MoE backbone) or a :class:`DenseModel` (one "expert",
no router). Caches: backbone ``[L, n_slots, max_len, K, hd]`` and router ``[Lr, n_slots, max_len,
Kr, hdr]``; slot s of a request holds its positions 0.. .

* **One call per step** (serve/engine/step.py): the batch's prompt chunks (a prompt of any length
  runs in chunks of the scheduler's budget) and decodes form one flat token list; attention reads
  each slot's cache rows once (serve/engine/attention.py); the expert FFN sorts the tokens by
  expert and reads only the experts present (serve/engine/experts.py); the router runs in the same
  call on the prompt tokens and on each sampled token, so the scheduler knows the expert of every
  queued token before the backbone runs it (route lookahead). The backbone uses the routes the
  scheduler was given, so what the scheduler planned is what runs.
* **Compiled shapes** are powers of two (rows, tokens, attention window) plus three flags
  (serve/engine/layout.py); each compiles on first use, ahead of its run, and the time goes to
  ``compile_s`` (never into a step's time); :meth:`Engine.warm` compiles a set ahead.
* **Expert store** (``Engine(model, cfg, store=ExpertStore(...))``, serve/engine/expert_store.py):
  the experts' own weights stay in host memory and at most ``store.capacity`` are on the device;
  a step is cut into calls whose experts fit (serve/engine/calls.py); the wait for copies is
  measured (``StepOutput.stall_s``) and the next call's copies start while one computes.
* **Mesh** (``EngineConfig.mesh``, serve/engine/placement.py): experts sharded over the mesh's
  ``expert`` axis, a ``shard_map`` FFN (one all-reduce per layer); outputs equal one device's.
* **Sampling**: greedy (temperature 0), temperature, top-p, top-k; each request has its own key
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
from readme_jax.serve.engine.calls import cut_by_experts, pack_calls
from readme_jax.serve.engine.expert_store import ExpertStore
from readme_jax.serve.engine.experts import EXPERT_KEYS, expert_slots
from readme_jax.serve.engine.layout import CallLayout, Piece, lay_out, padding_layout
from readme_jax.serve.engine.placement import engine_placement
from readme_jax.serve.engine.step import ServedModel, backbone_of, route_prompt_fn, step_fn
from readme_jax.serve.scheduling.requests import Batch, Kind, Request, StepOutput


@dataclasses.dataclass
class ReqState:
    """The engine's view of one request."""

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


class Engine:
    """Slot-based engine over one model, Read-ME or dense (module doc).

    Step times are measured wall clock (host layout, the call, reading back the tokens); a new
    compiled shape is compiled before its first run and that time goes to ``compile_s``.
    """

    def __init__(self, model: ServedModel, cfg: EngineConfig = EngineConfig(), *, store: ExpertStore | None = None):
        params, self.backbone_cfg = backbone_of(model)
        model.validate()
        self.model, self.cfg, self.store = model, cfg, store
        self.max_prompt_len = cfg.max_len - 1
        self.lookahead: Callable[[], Sequence] | None = None  # known future expert sets (prefetch, Belady)
        self._future: list = []
        self.placement = pl = engine_placement(model, cfg, store)  # None: one device
        if store is not None and (not model.is_moe or store.n_experts != model.n_experts):
            raise ConfigError("engine: the expert store must be built from the Read-ME model it serves")
        if pl is not None:  # experts sharded over the mesh (scan-sliced stacks), the rest replicated
            self._step = step_fn(model, pl.ffn)
            self.params, self.slots = pl.backbone(params), ()
        elif model.is_moe:  # the experts as slots the FFN reads in its branches (serve/engine/experts.py)
            self._step = step_fn(model)
            if store is not None:
                self.params, self.slots = store.base_params, None  # the call's pool comes from the store
            else:
                layers = params["layers"]
                base = {**params, "layers": {k: v for k, v in layers.items() if k not in EXPERT_KEYS}}
                self.params, self.slots = self._put((base, expert_slots(layers)))
        else:
            self._step = step_fn(model)
            self.params, self.slots = self._put(params), ()
        put = self._put if pl is None else pl.replicate
        self.rparams = put(model.router_params) if model.is_moe else None
        self._route = route_prompt_fn(model) if model.is_moe else None
        self._compiled: set = set()
        self.compile_s = 0.0  # compiling new shapes (never inside a step's time)
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Empty every slot and forget every request (compiled programs are kept)."""
        m, c = self.model, self.cfg
        self.cache = decoder.init_cache(self.backbone_cfg, c.n_slots, c.max_len)
        self.rcache = decoder.init_cache(m.router_cfg, c.n_slots, c.max_len) if m.is_moe else None
        if self.placement is not None:  # on a mesh: the caches are replicated
            self.cache, self.rcache = self.placement.replicate((self.cache, self.rcache))
        else:
            self.cache, self.rcache = self._put((self.cache, self.rcache))
        self._reqs: dict[int, ReqState] = {}
        self._slot_owner: dict[int, int] = {}
        self.router_s = 0.0  # measured: prompt routing at arrival

    def output(self, rid: int) -> list[int]:
        """Tokens generated so far for ``rid``."""
        return list(self._request_state(rid).tokens)

    def outputs(self) -> dict[int, list[int]]:
        return {rid: list(s.tokens) for rid, s in self._reqs.items()}

    def routes(self, rid: int) -> np.ndarray:
        """Routes of the prompt and of every generated token so far (the last one included)."""
        st = self._request_state(rid)
        return np.concatenate([st.prompt_routes, np.asarray(st.routes, np.int32)]).astype(np.int32)

    def release(self, rid: int) -> None:
        """Forget request ``rid`` (finished or cancelled): its slot is free for the next prompt, its
        state is dropped (a long-running server would otherwise keep every request's tokens)."""
        st = self._reqs.pop(int(rid), None)
        if st is not None and st.slot is not None and self._slot_owner.get(st.slot) == st.rid:
            del self._slot_owner[st.slot]

    @staticmethod
    def _put(tree):
        """On the device, committed: every call then sees the same placement as the step's outputs
        (a fresh uncommitted cache against a committed one would be a second compilation)."""
        return jax.device_put(tree, jax.devices()[0])

    def _request_state(self, rid: int) -> ReqState:
        if rid not in self._reqs:
            raise RequestError(f"engine: unknown request id {rid}")
        return self._reqs[rid]

    # ------------------------------------------------------------------ admission

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
        T = self.cfg.tokens(ids.size)
        tok = np.zeros((1, T), np.int32)
        tok[0, :ids.size] = ids
        self._compile(("route", T), lambda: self._route.lower(self.rparams, tok))
        return np.asarray(self._route(self.rparams, tok))[0, :ids.size].astype(np.int32)

    def new_request(self, rid: int, prompt_ids, max_new_tokens: int, *, arrival_s: float = 0.0,
                    sampling_params: SamplingParams | None = None) -> Request:
        """Validate, route the prompt (timed into ``router_s``) and return the scheduler's Request."""
        sp = sampling_params or SamplingParams()
        ids = self.check_request(rid, prompt_ids, max_new_tokens, sp)
        t0 = time.perf_counter()
        c0 = self.compile_s
        routes = self.route_prompt(ids)
        self.router_s += time.perf_counter() - t0 - (self.compile_s - c0)
        req = Request(int(rid), float(arrival_s), routes, int(max_new_tokens), prompt_ids=ids)
        seed = int(rid) % 2**31 if sp.seed is None else int(sp.seed)
        self._reqs[int(rid)] = ReqState(int(rid), ids, int(max_new_tokens), float(sp.temperature), float(sp.top_p),
                                        seed, [], routes, [], top_k=int(sp.top_k))
        return req

    # ------------------------------------------------------------------ steps

    def step(self, batch: Batch) -> StepOutput:
        """Run one scheduler batch: one call (or, with an expert store, calls that fit its pool)."""
        items = self._pieces(batch)
        if self.store is None:
            calls = [[p for ps in items for p in ps]]
        else:
            calls = pack_calls(items, self.store.resident, self.store.max_call_experts)
        sets = [frozenset().union(*(p.experts for p in c)) for c in calls]
        known = self._known_future()
        stall0 = self.store.stats.stall_s if self.store is not None else 0.0
        out_tok: dict = {}
        out_route: dict = {}
        seconds = 0.0
        for i, call in enumerate(calls):
            self._future = list(sets[i + 1:]) + known
            seconds += self._call(call, out_tok, out_route)
        stall = (self.store.stats.stall_s - stall0) if self.store is not None else 0.0
        experts = frozenset().union(*sets) if self.model.is_moe else frozenset()
        return StepOutput(out_route, out_tok, seconds, stall, experts)

    def _known_future(self) -> list:
        """The expert sets of the work queued after this step (``lookahead()``), for the store's
        prefetch and Belady; empty when nothing uses it (the lookahead is a scheduler dry run)."""
        uses = self.store is not None and self.store.uses_future and self.lookahead is not None
        return list(self.lookahead()) if uses else []

    def _state(self, req: Request) -> ReqState:
        st = self._reqs.get(req.rid)
        if st is None:
            raise RequestError(f"engine: request {req.rid} was not created by this engine (use new_request)")
        if st.done:
            raise ReadmeError(f"engine: request {req.rid} already finished; it cannot run again")
        return st

    def _pieces(self, batch: Batch) -> list[list[Piece]]:
        """Validate the batch, give each new prompt its slot; per item, its pieces in order (one
        piece without an expert store)."""
        S = self.cfg.n_slots
        cap = self.store.max_call_experts if self.store is not None else None
        out = []
        seen: set = set()
        for it in batch.items:
            st = self._state(it.request)
            if st.rid in seen:
                raise ReadmeError(f"engine: request {st.rid} appears twice in step {batch.step}")
            seen.add(st.rid)
            if it.kind is Kind.PREFILL:
                if st.slot is None:
                    if not 0 <= it.slot < S or it.slot in self._slot_owner:
                        raise ReadmeError(f"engine: slot {it.slot} of request {st.rid} is out of range [0, {S}) or "
                                          f"held by request {self._slot_owner.get(it.slot)}")
                    st.slot = it.slot
                    self._slot_owner[it.slot] = st.rid
                elif st.slot != it.slot or st.tokens:
                    raise ReadmeError(f"engine: request {st.rid} is already prefilled or runs in slot {st.slot}")
                m, start, P = it.n_tokens, st.pos, st.prompt.size
                if start + m > P:
                    raise ReadmeError(f"engine: prompt chunk of {m} tokens from {start} exceeds request {st.rid}'s "
                                      f"prompt of {P}")
                routes = st.prompt_routes[start:start + m]
                spans = cut_by_experts(routes, cap) if cap else [(0, m)]
                out.append([Piece(st, start + a, b - a, True, start + b == P,
                                  frozenset(int(e) for e in routes[a:b])) for a, b in spans])
            else:
                if st.slot is None or st.slot != it.slot or not st.tokens:
                    raise ReadmeError(f"engine: decode of request {st.rid} in slot {it.slot}, but it was prefilled "
                                      f"into slot {st.slot}")
                if it.request.next_route is not None and it.request.next_route != st.route:
                    raise ReadmeError(f"engine: scheduler has route {it.request.next_route} for request {st.rid}'s "
                                      f"next token, the engine routed it to {st.route}")
                out.append([Piece(st, st.pos, 1, False, True, frozenset({int(st.route)}))])
        return out

    def _call(self, pieces: list[Piece], out_tok: dict, out_route: dict) -> float:
        """One jitted call over ``pieces``; updates the requests' states; returns its measured
        seconds (compilation and the expert store's wait excluded)."""
        t0 = time.perf_counter()
        lay = lay_out(pieces, self.cfg, pool=self.store is not None)
        wait = 0.0
        slots = self.slots
        if self.store is not None:
            w0 = time.perf_counter()
            bufs = self.store.acquire(lay.experts, self._future)
            slots = tuple(bufs) + (bufs[0],) * (self.store.capacity - len(bufs))
            wait = time.perf_counter() - w0
        c0 = self.compile_s
        nxt, nroute = self._run(lay, slots)
        if self.store is not None:
            self.store.prefetch(self._future, busy=lay.experts)
        nxt, nroute = np.asarray(nxt), np.asarray(nroute)
        seconds = time.perf_counter() - t0 - wait - (self.compile_s - c0)
        for st, start, m, samples, b in lay.rows:
            st.pos = start + m
            if samples:
                self._finish_token(st, int(nxt[b]), int(nroute[b]), out_tok, out_route)
        return seconds

    def _run(self, lay: CallLayout, slots):
        """Run the step program of ``lay`` on the engine's caches (compiling it first if new)."""
        args = (self.params, slots, self.rparams, self.cache, self.rcache, lay.tokens_5N, lay.rows_8B, lay.rows_2B)
        self._compile(lay.key, lambda: self._step.lower(*args, **lay.static))
        nxt, nroute, self.cache, self.rcache = self._step(*args, **lay.static)
        return nxt, nroute

    def _compile(self, key: tuple, lower: Callable) -> None:
        """Compile a new shape ahead of its run (``lower().compile()`` fills jit's cache), timed into
        ``compile_s``."""
        if key in self._compiled:
            return
        t0 = time.perf_counter()
        lower().compile()
        self._compiled.add(key)
        self.compile_s += time.perf_counter() - t0

    def _finish_token(self, st: ReqState, tok: int, route: int, out_tok: dict, out_route: dict) -> None:
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

    # ------------------------------------------------------------------ compiling ahead, timing

    def warm(self, shapes: Sequence[tuple] | None = None, progress: Callable[[str], None] | None = None) -> float:
        """Compile ``shapes`` ahead (default :meth:`serving_shapes`), each ``(N, B, window, n_tail,
        greedy, prompts)``; ``progress`` gets a line per shape. Returns the seconds it took."""
        shapes = self.serving_shapes() if shapes is None else shapes
        t0 = time.perf_counter()
        for i, (N, B, W, n_tail, greedy, prompts) in enumerate(shapes):
            lay = padding_layout(self.cfg, N, B, window=W, n_tail=n_tail, greedy=greedy, prompts=prompts)
            c0 = self.compile_s
            self._compile(lay.key, lambda: self._step.lower(self.params, self._warm_slots(), self.rparams, self.cache,
                                                            self.rcache, lay.tokens_5N, lay.rows_8B, lay.rows_2B,
                                                            **lay.static))
            if progress is not None:
                progress(f"compiled {i + 1}/{len(shapes)}: {N} tokens, {B} rows, window {W} "
                         f"({self.compile_s - c0:.1f} s)")
        return time.perf_counter() - t0

    def serving_shapes(self) -> list[tuple]:
        """The programs a server meets first (greedy, smallest window for prompts): decode steps of
        1 .. n_slots requests at every window; a new prompt's first chunk of each size up to the
        token budget, alone; and steps of several requests with prompt tokens (all slots' rows)."""
        c = self.cfg
        rows = sorted({c.rows(n) for n in range(1, c.n_slots + 1)})
        w0 = c.windows()[0]
        shapes = [(B, B, W, 0, True, False) for B in rows for W in c.windows()]
        shapes += [(N, 1, w0, 0, True, True) for N in sorted({c.tokens(n) for n in range(1, c.token_budget + 1)})]
        if c.n_slots > 1:
            S = c.n_slots
            shapes += [(N, S, w0, 0, True, True)
                       for N in sorted({c.tokens(S + n - 2) for n in range(2, c.token_budget + 1)})]
        return shapes

    def _warm_slots(self):
        if self.store is not None:
            return self.store.scratch_pool()
        return self.slots

    def time_step(self, N: int, B: int, routes=None, *, window: int, repeats: int = 1, prompts: bool = False) -> np.ndarray:
        """Measured seconds of ``repeats`` greedy steps of N padding tokens over B padding rows (full
        compute of the backbone and router; ``routes``: the experts the tokens run; nothing is
        attended to or written). For benchmarks; the caches are untouched."""
        lay = padding_layout(self.cfg, N, B, routes, window=window, prompts=prompts)
        slots = self._warm_slots()
        self._run(lay, slots)  # compiles if new, and one untimed run
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            nxt, _ = self._run(lay, slots)
            np.asarray(nxt)
            out.append(time.perf_counter() - t0)
        return np.asarray(out)
