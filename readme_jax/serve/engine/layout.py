"""The host side of one engine call: requests' pieces laid out as the step's arrays.

A **piece** is consecutive tokens of one request that run in one call: a decode (its last
sampled token) or a prompt chunk. Without an expert store a step is one call holding every
item of the scheduler's batch; with one, items are cut into pieces that fit the pool
(serve/engine/calls.py). :func:`lay_out` turns a call's pieces into the arrays of
serve/engine/step.py, laid out for the ragged attention (serve/engine/attention.py):

* one row per request (its consecutive pieces merged); rows whose prompt chunk continues an
  earlier one (its first tokens are in the cache) come last, as the ``n_tail`` tail rows;
* token slot b < B holds row b's first token; further tokens of multi-token rows follow at slots
  >= B, contiguous per row;
* padding: rows with slot ``n_slots`` (nothing read or written), tokens of row -1.

Shapes are powers of two (``EngineConfig.rows``, ``tokens``, ``window``), and the static flags
(``n_tail``, ``greedy``, ``prompts``) complete the compiled program's key. To keep the programs
few: a decode-only step has a power of two of rows, a step with prompt tokens one row (a single
request) or all ``n_slots`` rows, and ``n_tail`` is 0, 1 or all rows.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from readme_jax.config import EngineConfig
from readme_jax.errors import ReadmeError


class Piece(NamedTuple):
    """Consecutive tokens of one request that run in one call."""

    st: object  # the engine's per-request state (serve/engine/engine.py: ReqState)
    start: int  # position of the first token
    m: int  # tokens
    prefill: bool
    samples: bool  # its last token's logits are sampled (a decode, or a prompt's last chunk)
    experts: frozenset


@dataclasses.dataclass
class CallLayout:
    tokens_5N: np.ndarray  # int32 [5, N]: id, position, row, route, is-prompt
    rows_8B: np.ndarray  # int32 [8, B]: slot, ctx, rctx, last, samples, seed, counter, top_k
    rows_2B: np.ndarray  # float32 [2, B]: temperature, top_p
    static: dict  # window, n_tail, greedy, prompts
    rows: list  # per real row: (its state, start, m, samples, row index)
    experts: tuple  # the call's true experts, ascending (the expert store's pool order)

    @property
    def key(self) -> tuple:
        """The compiled program this call runs: ``(N, B, window, n_tail, greedy, prompts)``."""
        s = self.static
        return (self.tokens_5N.shape[1], self.rows_8B.shape[1], s["window"], s["n_tail"], s["greedy"], s["prompts"])


def lay_out(pieces, cfg: EngineConfig, pool: bool = False) -> CallLayout:
    """The arrays of one call over ``pieces`` (module doc). ``pool``: routes become indices into
    the call's experts in ascending order (the expert store's buffers), else expert ids."""
    merged: dict[int, list] = {}
    for p in pieces:  # one row per request; its pieces in order, contiguous
        cur = merged.get(id(p.st))
        if cur is None:
            merged[id(p.st)] = [p.st, p.start, p.m, p.prefill, p.samples]
        else:
            if cur[1] + cur[2] != p.start:
                raise ReadmeError(f"engine: request {p.st.rid}'s pieces in one call are not contiguous")
            cur[2] += p.m
            cur[4] = p.samples
    front = [r for r in merged.values() if not (r[3] and r[1] > 0)]
    back = [r for r in merged.values() if r[3] and r[1] > 0]  # later chunks: they read the cache
    S = cfg.n_slots
    n_rows = len(front) + len(back)
    prompts = any(r[3] for r in merged.values())
    # rows: a decode-only step its power of two; a step with prompt tokens one row when it is one
    # request, else every slot (arrivals mix requests in many ways: this keeps their programs few)
    B = cfg.n_slots if prompts and n_rows > 1 else cfg.rows(n_rows)
    n_tail = (1 if len(back) == 1 else B) if back else 0  # later chunks: one (the common case) or all rows
    extra = sum(r[2] - 1 for r in merged.values())
    N = cfg.tokens(B + extra)
    tok = np.zeros((5, N), np.int32)
    tok[2] = -1  # padding tokens: row -1
    tok[3] = -1  # no expert
    rows = np.zeros((8, B), np.int32)
    rows[0] = S  # padding rows: out-of-range slot
    rows[3] = np.arange(B)  # a padding row "samples" its aligned slot (ignored)
    rf = np.zeros((2, B), np.float32)
    rf[1] = 1.0
    order = [(b, r) for b, r in enumerate(front)] + [(B - len(back) + j, r) for j, r in enumerate(back)]
    tail = B
    need = 1
    out_rows = []
    greedy = True
    for b, (st, start, m, prefill, samples) in order:
        if st.pos != start:
            raise ReadmeError(f"engine: request {st.rid} is at position {st.pos}, its piece starts at {start}")
        idx = np.concatenate([[b], np.arange(tail, tail + m - 1)]).astype(np.int64)
        tail += m - 1
        if prefill:
            tok[0, idx] = st.prompt[start:start + m]
            tok[3, idx] = st.prompt_routes[start:start + m]
            tok[4, idx] = 1
            rctx = start
        else:
            tok[0, b] = st.tokens[-1]
            tok[3, b] = st.route
            rctx = start + 1  # the decode token's router key is cached (written when it was sampled)
        tok[1, idx] = np.arange(start, start + m)
        tok[2, idx] = b
        rows[:5, b] = (st.slot, start, rctx, idx[-1], samples)
        if samples:
            rows[5:, b] = (st.seed, len(st.tokens), st.top_k)
            rf[:, b] = (st.temperature, st.top_p)
            greedy &= st.temperature <= 0
        need = max(need, rctx, start)
        out_rows.append((st, start, m, samples, b))
    experts: tuple = ()
    if pool:
        r = tok[3]
        ex = np.unique(r[r >= 0]).astype(np.int32)
        tok[3] = np.where(r >= 0, np.searchsorted(ex, np.maximum(r, 0)), -1)
        experts = tuple(int(e) for e in ex)
    static = {"window": cfg.window(need), "n_tail": int(n_tail), "greedy": bool(greedy), "prompts": prompts}
    return CallLayout(tok, rows, rf, static, out_rows, experts)


def padding_layout(cfg: EngineConfig, N: int, B: int, routes=None, *, window: int, n_tail: int = 0,
                   greedy: bool = True, prompts: bool = False) -> CallLayout:
    """A call of padding only with the given shape (nothing attended to or written): for compiling
    ahead and for timing. ``routes`` (length N): experts the padding tokens run, full compute."""
    tok = np.zeros((5, N), np.int32)
    tok[2] = -1
    tok[3] = -1 if routes is None else np.asarray(routes, np.int32)
    rows = np.zeros((8, B), np.int32)
    rows[0] = cfg.n_slots
    rows[3] = np.arange(B) % N
    rf = np.zeros((2, B), np.float32)
    rf[1] = 1.0
    static = {"window": int(window), "n_tail": int(n_tail), "greedy": bool(greedy), "prompts": bool(prompts)}
    return CallLayout(tok, rows, rf, static, [], ())
