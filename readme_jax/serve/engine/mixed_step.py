"""The engine's one-call-per-step mode (``EngineConfig.mixed_step``): prefill chunks and decodes of
a scheduler batch as one flat token list (the jitted step is :func:`readme_jax.serve.engine.flat.make_mixed_fn`).

Without an expert store a step is ONE call. With one (``Engine(..., store=ExpertStore(...))``)
a call may use at most ``store.max_call_experts`` experts, the pool's slots, so the step is cut:

* each item becomes pieces: a decode is one piece (one token, one expert); a prompt chunk is
  cut where its next token would bring a piece over that many experts (consecutive tokens of
  one prompt, in order);
* pieces are packed into calls first-fit, pieces whose experts are all resident first, a
  request's later piece never in an earlier call than its earlier piece (a piece attends to
  its slot's cache below its start, plus the same call's same-slot tokens);
* each call acquires its experts from the store (the wait is the measured stall), hands them
  to the FFN as a tuple of exactly ``capacity`` buffers (padded; the FFN skips slots with no
  token, so the compiled shapes do not depend on how many experts a call has) and the tokens'
  routes as indices into it, and starts the next call's copies while it computes (prefetch).

A step whose work fits the pool is one call. Every call's compiled shape is
``(token bucket, sample rows, window, greedy)``, the same programs as without a store.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from readme_jax.errors import ConfigError, ReadmeError
from readme_jax.serve.scheduling.requests import Batch, Kind, StepOutput


class Piece(NamedTuple):
    """Consecutive tokens of one request that run in one call."""

    st: object  # the engine's per-request state
    start: int  # position of the first token
    m: int  # tokens
    prefill: bool
    samples: bool  # its last token's logits are sampled (a decode, or a prompt's last chunk)
    experts: frozenset


def cut_by_experts(routes, cap: int) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: consecutive spans of ``routes`` covering it, each with at most ``cap``
    distinct values, each as long as it can be."""
    spans, a, cur = [], 0, set()
    for i, e in enumerate(int(x) for x in routes):
        if e not in cur and len(cur) == cap:
            spans.append((a, i))
            a, cur = i, set()
        cur.add(e)
    spans.append((a, len(routes)))
    return spans


def pack_calls(items: list[list[Piece]], resident, cap: int) -> list[list[Piece]]:
    """Pieces (one list per item, in order) as calls of at most ``cap`` experts: first fit, heads
    whose experts are all resident first, then by smallest expert id; an item's next piece
    becomes a candidate once its previous piece is placed."""
    queues = [list(ps) for ps in items if ps]
    res = set(int(e) for e in resident)
    calls = []
    while any(queues):
        call, ex, grew = [], set(), True
        while grew:
            grew = False
            heads = sorted((q for q in queues if q), key=lambda q: (not q[0].experts <= res, min(q[0].experts)))
            for q in heads:
                if len(ex | q[0].experts) <= cap:
                    p = q.pop(0)
                    call.append(p)
                    ex |= p.experts
                    grew = True
        calls.append(call)
        res |= ex  # ordering hint for the next call: this call's experts are resident after it
    return calls


class MixedStep:
    """Engine mixin: the one-call step (module doc). Uses the Engine's state and helpers."""

    def _step_mixed(self, batch: Batch):
        items = self._mixed_pieces(batch)
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
            seconds += self._mixed_call(call, out_tok, out_route)
        stall = (self.store.stats.stall_s - stall0) if self.store is not None else 0.0
        experts = frozenset().union(*sets) if self.model.is_moe else frozenset()
        return StepOutput(out_route, out_tok, 0.0, seconds, stall, experts)

    def _mixed_pieces(self, batch: Batch) -> list[list[Piece]]:
        """Validate the batch, give each new prefill its slot; per item, its pieces in order."""
        S = self.cfg.n_slots
        cap = self.store.max_call_experts if self.store is not None else None
        out = []
        for it in batch.items:
            st = self._state(it.request)
            if it.kind is Kind.PREFILL:
                if st.slot is None:
                    if not 0 <= it.slot < S or it.slot in self._slot_owner:
                        raise ReadmeError(f"engine: slot {it.slot} of request {st.rid} is out of range or held by "
                                          f"request {self._slot_owner.get(it.slot)}")
                    st.slot = it.slot
                    self._slot_owner[it.slot] = st.rid
                elif st.slot != it.slot or st.tokens:
                    raise ReadmeError(f"engine: request {st.rid} is already prefilled or runs in slot {st.slot}")
                m, start, P = it.n_tokens, st.pos, st.prompt.size
                if start + m > P:
                    raise ReadmeError(f"engine: prefill chunk of {m} tokens from {start} exceeds request {st.rid}'s "
                                      f"prompt of {P}")
                routes = np.asarray(it.request.prompt_routes[start:start + m])
                spans = cut_by_experts(routes, cap) if cap else [(0, m)]
                out.append([Piece(st, start + a, b - a, True, start + b == P,
                                  frozenset(int(e) for e in routes[a:b])) for a, b in spans])
            else:
                self._check_decode(st, it.request, it.slot)
                out.append([Piece(st, st.pos, 1, False, True, frozenset({int(st.route)}))])
        return out

    def _mixed_call(self, pieces: list[Piece], out_tok: dict, out_route: dict) -> float:
        """One jitted call over ``pieces``; updates the requests' states; returns measured seconds."""
        t0 = time.perf_counter()
        S = self.cfg.n_slots
        n = sum(p.m for p in pieces)
        N = self.cfg.tokens(n)
        R = self.cfg.rows(min(N, S))
        tok = np.zeros((N,), np.int32)
        pos = np.zeros((N,), np.int32)
        slot = np.full((N,), S, np.int32)  # padding tokens: out-of-range slot (never attended, never written)
        ctx = np.zeros((N,), np.int32)
        route = np.full((N,), -1, np.int32)
        is_prompt = np.zeros((N,), bool)
        sample = np.zeros((R,), np.int32)
        rslot = np.full((R,), S, np.int32)
        rctx = np.zeros((R,), np.int32)
        seeds, counters, top_ks = (np.zeros((R,), np.int32) for _ in range(3))
        temps, tops = np.zeros((R,), np.float32), np.ones((R,), np.float32)
        rows, i, r = [], 0, 0
        for p in pieces:
            st, m = p.st, p.m
            if st.pos != p.start:
                raise ReadmeError(f"engine: request {st.rid} is at position {st.pos}, its piece starts at {p.start}")
            if p.prefill:
                tok[i:i + m] = st.prompt[p.start:p.start + m]
                pos[i:i + m] = np.arange(p.start, p.start + m)
                route[i:i + m] = st.prompt_routes[p.start:p.start + m]
                slot[i:i + m], ctx[i:i + m], is_prompt[i:i + m] = st.slot, p.start, True
                if p.samples:
                    sample[r], rslot[r], rctx[r], counters[r] = i + m - 1, st.slot, p.start, 0
            else:
                tok[i], pos[i], slot[i], ctx[i], route[i] = st.tokens[-1], st.pos, st.slot, st.pos, st.route
                sample[r], rslot[r], rctx[r], counters[r] = i, st.slot, st.pos + 1, len(st.tokens)
            if p.samples:
                seeds[r], temps[r], tops[r], top_ks[r] = st.seed, st.temperature, st.top_p, st.top_k
                rows.append((p, r))
                r += 1
            else:
                rows.append((p, None))
            i += m
        experts: tuple = ()
        if self.store is not None:  # routes as indices into the call's pool (experts ascending)
            ex = np.unique(route[route >= 0]).astype(np.int32)
            route = np.where(route >= 0, np.searchsorted(ex, np.maximum(route, 0)), -1).astype(np.int32)
            experts = tuple(int(e) for e in ex)
        W = self.cfg.window(int(pos[:n].max()))
        greedy = bool((temps[:r] <= 0).all())
        prep = time.perf_counter() - t0
        nxt, nroute, call_s = self._run_compiled(
            self._mixed, ("mixed", N, R, W), (tok, pos, slot, ctx, route, is_prompt, sample, rslot, rctx, seeds,
                                             counters, temps, tops, top_ks), greedy, experts=experts,
            pool_size=self.store.capacity if self.store is not None else None, window=W)
        for p, row in rows:
            p.st.pos = p.start + p.m
            if row is not None:
                self._finish_token(p.st, int(nxt[row]), int(nroute[row]), out_tok, out_route)
        return prep + call_s

    def warm_mixed(self, max_tokens: int, greedy: bool = True) -> float:
        """Compile (and run once, on padding only: nothing is written) every mixed-step program a
        step of at most ``max_tokens`` tokens can use: each token bucket up to
        ``cfg.tokens(max_tokens)`` times each attention window. Returns the seconds it took. With
        an expert store the pool is a scratch copy of one expert (the store's cache is untouched)."""
        if not self.cfg.mixed_step:
            raise ConfigError("warm_mixed: the engine is not in mixed_step mode")
        top = self.cfg.tokens(max_tokens)
        windows = sorted({self.cfg.window(p) for p in range(self.cfg.max_len - 1)})
        n_ex = self.store.capacity if self.store is not None else self.model.n_experts
        params = self.params
        if self.store is not None:
            params = {**params, "layers": {**params["layers"], "pool": self.store.scratch_pool()}}
        t0 = time.perf_counter()
        for N in [b for b in self.cfg.mixed_buckets() if b <= top]:
            # padding routed to every expert, so each expert's branch runs once here (XLA:CPU's
            # first run of a branch is slow)
            R, args = self.padding_mixed_args(N, np.arange(N) % n_ex)
            for W in windows:
                self._warmup(("mixed", N, R, W, greedy), lambda: self._run_compiled(
                    self._mixed, ("mixed", N, R, W), args, greedy, window=W, params=params)[:2])
        return time.perf_counter() - t0

    def padding_mixed_args(self, N: int, routes) -> tuple[int, tuple]:
        """``(R, args)`` of a mixed step of N padding tokens with the given routes: full compute,
        nothing attended to or written (every slot out of range). For warm-up and measurement."""
        S = self.cfg.n_slots
        R = self.cfg.rows(min(N, S))
        z, zr = np.zeros((N,), np.int32), np.zeros((R,), np.int32)
        return R, (z, z, np.full((N,), S, np.int32), z, np.asarray(routes, np.int32), np.zeros((N,), bool), zr,
                   np.full((R,), S, np.int32), zr, zr, zr, np.zeros((R,), np.float32), np.ones((R,), np.float32), zr)
