"""Log-likelihood of continuations, batched at a few fixed lengths (what lm-evaluation-harness asks).

A row is a token list and the number of its last tokens to score. Rows are padded on the right to
the smallest length bucket that holds them and batched ``batch_size`` at a time (short batches are
filled with dummy rows), so the jitted forward compiles once per bucket, not per request. Right
padding never changes a scored position: the decoder and the Read-ME router are causal, and the
router routes every token from the whole (real) sequence before it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import decoder
from readme_jax.model.readme_model import DenseModel, ReadMEModel


def length_buckets(max_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` itself."""
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


def logits_of(model: ReadMEModel | DenseModel, tokens_BT):
    """Float32 logits ``[B, T, V]``; a Read-ME model routes with its own router."""
    if model.is_moe:
        return model(tokens_BT).logits
    return decoder.forward(model.params, model.cfg, tokens_BT)[0]


@jax.jit
def token_logprobs(model: ReadMEModel | DenseModel, tokens_BT):
    """``(log p(token t+1 | tokens <= t) [B, T-1], is that token the argmax [B, T-1])``."""
    logits = logits_of(model, tokens_BT[:, :-1]).astype(jnp.float32)
    targets = tokens_BT[:, 1:]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return lp, jnp.argmax(logits, axis=-1) == targets


def score_rows(model, rows: Sequence[tuple[Sequence[int], int]], *, batch_size: int, max_length: int,
               pad_id: int = 0, progress=None) -> list[tuple[float, bool]]:
    """``(sum of log-probs of the last n tokens, all of them greedy)`` per ``(tokens, n)`` row, in order.

    A row keeps its last ``max_length + 1`` tokens (the scored ones must fit: ``1 <= n <= max_length``).
    ``progress(k)`` is called with the number of rows done after each batch.
    """
    buckets = length_buckets(max_length)
    rows = [(list(t)[-(max_length + 1):], int(n)) for t, n in rows]
    for i, (t, n) in enumerate(rows):
        if not 1 <= n <= len(t) - 1:
            raise ValueError(f"row {i}: {n} scored tokens of {len(t)} (need 1 <= n <= len - 1 and n <= max_length)")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    s = 0
    while s < len(order):
        T = next(b for b in buckets if b >= len(rows[order[s]][0]) - 1)
        group = order[s:s + batch_size]
        tokens = np.full((batch_size, T + 1), pad_id, np.int32)
        for r, i in enumerate(group):
            t = rows[i][0]
            tokens[r, :len(t)] = t
        lp, greedy = (np.asarray(x) for x in token_logprobs(model, jnp.asarray(tokens)))
        for r, i in enumerate(group):
            t, n = rows[i]
            sl = slice(len(t) - 1 - n, len(t) - 1)
            out[i] = (float(lp[r, sl].astype(np.float64).sum()), bool(greedy[r, sl].all()))
        s += len(group)
        if progress is not None:
            progress(len(group))
    return out
