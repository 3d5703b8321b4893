"""The engine step's ragged attention (serve/engine/attention.py) against a float64 per-token
reference on fresh random inputs: rows of one token (decodes) and of many (first and later prompt
chunks), tail rows, padding rows and tokens, windows shorter than the cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.serve.engine.attention import ragged_attention


def _reference(q, k, v, ck, cv, pos, slot, key_ok, ctx):
    """float64: token n sees its slot's cache positions < ctx[n] and the step's visible keys of its
    slot at positions <= its own (and itself)."""
    q, k, v, ck, cv = (np.asarray(a, np.float64) for a in (q, k, v, ck, cv))
    N, H, hd = q.shape
    G = H // k.shape[1]
    out = np.zeros((N, H, hd))
    for n in range(N):
        keys, vals = [ck[slot[n], p] for p in range(ctx[n])], [cv[slot[n], p] for p in range(ctx[n])]
        for m in range(N):
            if m == n or (slot[m] == slot[n] and key_ok[m] and pos[m] <= pos[n]):
                keys.append(k[m])
                vals.append(v[m])
        kk, vv = np.stack(keys), np.stack(vals)
        for h in range(H):
            s = kk[:, h // G] @ q[n, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[n, h] = (p / p.sum()) @ vv[:, h // G]
    return out.reshape(N, H * hd)


def _case(rng, lengths, starts, n_rows_bucket, S=6, P=40, H=4, K=2, hd=8):
    """A step over rows with ``lengths[i]`` tokens from position ``starts[i]`` laid out as the engine
    does: later chunks (start > 0) last; aligned first tokens, then the further tokens."""
    rows = sorted(range(len(lengths)), key=lambda i: starts[i] > 0)
    n_back = sum(s > 0 for s in starts)
    B = n_rows_bucket
    index = {}
    f = b = 0
    for i in rows:
        if starts[i] > 0:
            index[i] = B - n_back + b
            b += 1
        else:
            index[i] = f
            f += 1
    N = B + sum(m - 1 for m in lengths)
    N = 1 << int(np.ceil(np.log2(N)))
    slots = rng.permutation(S)[:len(lengths)]
    pos, row, slot_tok = np.zeros(N, np.int32), np.full(N, -1, np.int32), np.full(N, -1, np.int64)
    tail = B
    for i, m in enumerate(lengths):
        idx = [index[i]] + list(range(tail, tail + m - 1))
        tail += m - 1
        pos[idx] = np.arange(starts[i], starts[i] + m)
        row[idx] = index[i]
        slot_tok[idx] = slots[i]
    slot_B = np.full(B, S, np.int32)
    ctx_B = np.zeros(B, np.int32)
    for i in range(len(lengths)):
        slot_B[index[i]], ctx_B[index[i]] = slots[i], starts[i]
    q = rng.standard_normal((N, H, hd)).astype(np.float32)
    k = rng.standard_normal((N, K, hd)).astype(np.float32)
    v = rng.standard_normal((N, K, hd)).astype(np.float32)
    ck = rng.standard_normal((S, P, K, hd)).astype(np.float32)
    cv = rng.standard_normal((S, P, K, hd)).astype(np.float32)
    return dict(q=q, k=k, v=v, ck=ck, cv=cv, pos=pos, row=row, slot_tok=slot_tok, slot_B=slot_B, ctx_B=ctx_B,
                n_tail=1 << int(np.ceil(np.log2(n_back))) if n_back else 0)


CASES = {
    "decodes": ([1, 1, 1], [5, 17, 30], 4),
    "one long first chunk": ([13], [0], 1),
    "first chunks and decodes": ([6, 1, 9, 1], [0, 11, 0, 3], 4),
    "later chunks and decodes": ([7, 1, 4, 1, 3], [12, 20, 5, 0, 0], 8),
    "one later chunk": ([16], [21], 1),
    "three later chunks (tail bucket 4)": ([3, 2, 4, 1], [12, 20, 5, 0], 8),
}


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("name", sorted(CASES))
def test_ragged_attention_equals_per_token_reference(name, seed):
    rng = np.random.default_rng([seed, len(name)])
    lengths, starts, B = CASES[name]
    c = _case(rng, lengths, starts, B)
    W = 32 if max(starts) < 32 else 40
    kc = jnp.asarray(c["ck"][np.minimum(c["slot_B"], 5), :W])
    vc = jnp.asarray(c["cv"][np.minimum(c["slot_B"], 5), :W])
    real = c["row"] >= 0
    f = jax.jit(ragged_attention, static_argnames=("n_tail",))
    got = np.asarray(f(jnp.asarray(c["q"]), jnp.asarray(c["k"]), jnp.asarray(c["v"]), kc, vc, jnp.asarray(c["pos"]),
                       jnp.asarray(c["row"]), jnp.asarray(real), jnp.asarray(c["ctx_B"]), n_tail=c["n_tail"]))
    ctx_tok = np.where(real, c["ctx_B"][np.maximum(c["row"], 0)], 0)
    want = _reference(c["q"], c["k"], c["v"], c["ck"], c["cv"], c["pos"], np.where(real, c["slot_tok"], -1 - np.arange(len(real))),
                      real, ctx_tok)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()  # padding tokens see themselves: finite, never NaN
