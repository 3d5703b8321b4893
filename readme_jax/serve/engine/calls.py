"""A step cut into calls whose experts fit the expert store's pool (``Engine(..., store=ExpertStore(...))``).

Without an expert store a step is ONE call. With one, a call may use at most
``store.max_call_experts`` experts, the pool's slots, so the step is cut:

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

A step whose work fits the pool is one call. Every call compiles like a step without a store
(serve/engine/layout.py), its expert slots being the pool's ``capacity`` buffers.
"""

from __future__ import annotations

from readme_jax.serve.engine.layout import Piece


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
