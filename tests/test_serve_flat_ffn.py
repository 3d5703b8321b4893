"""The mixed step's expert FFNs (serve/flat.py) against a float64 numpy per-token reference, on
fresh random inputs: group sizes at every tile edge, empty experts, padding, a split layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.serve.engine.flat import ROW_TILES, experts_cond_ffn, experts_grouped_ffn, group_plan


def _swiglu64(x, wg, wu, wd):
    g, u = x @ wg, x @ wu
    return (g / (1 + np.exp(-g)) * u) @ wd


def _reference(lp, h, route):
    """float64: each token through its own expert (+ the shared part); padding (-1) gets only shared."""
    p = {k: np.asarray(v, np.float64) for k, v in lp.items()}
    x = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
    r = np.asarray(route).reshape(-1)
    y = np.zeros_like(x)
    for i, e in enumerate(r):
        if e >= 0:
            y[i] = _swiglu64(x[i], p["wg"][e], p["wu"][e], p["wd"][e])
    if "shared_wg" in p:
        y += _swiglu64(x, p["shared_wg"], p["shared_wu"], p["shared_wd"])
    return y.reshape(h.shape)


def _layer(rng, E, D, F, shared):
    lp = {"wg": rng.standard_normal((E, D, F)) * 0.3, "wu": rng.standard_normal((E, D, F)) * 0.3,
          "wd": rng.standard_normal((E, F, D)) * 0.3}
    if shared:
        lp.update(shared_wg=rng.standard_normal((D, shared)) * 0.3, shared_wu=rng.standard_normal((D, shared)) * 0.3,
                  shared_wd=rng.standard_normal((shared, D)) * 0.3)
    return {k: jnp.asarray(v, jnp.float32) for k, v in lp.items()}


def _routes(rng, N, E, counts):
    """Routes with the given per-expert counts (the rest padding), shuffled."""
    r = np.concatenate([np.full(c, e) for e, c in enumerate(counts)] + [np.full(N - sum(counts), -1)])
    return rng.permutation(r).astype(np.int32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("N", [8, 48, 96])
def test_grouped_ffn_equals_float64_per_token_reference(seed, N):
    rng = np.random.default_rng([seed, N])
    E, D, F = 5, 12, 8
    lp = _layer(rng, E, D, F, shared=6 if seed % 2 else 0)
    h = jnp.asarray(rng.standard_normal((N, 1, D)), jnp.float32)
    # group sizes on both sides of every tile edge, an empty expert, and some padding
    edges = [t + d for t in ROW_TILES for d in (-1, 0, 1)] + [1, N]
    counts = np.zeros(E, int)
    left = N - rng.integers(0, 4)
    for e in rng.permutation(E)[:-1]:  # one expert stays empty
        c = int(min(left, rng.choice(edges)))
        counts[e], left = c, left - c
    route = _routes(rng, N, E, counts)
    ffn = jax.jit(lambda lp, h, r: experts_grouped_ffn(lp, h, group_plan(r.reshape(-1), E))[0])
    got = np.asarray(ffn(lp, h, jnp.asarray(route)[:, None]))
    want = _reference(lp, np.asarray(h), route[:, None])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # the older FFN gives the same
    old = np.asarray(jax.jit(lambda lp, h, r: experts_cond_ffn(lp, h, r)[0])(lp, h, jnp.asarray(route)[:, None]))
    np.testing.assert_allclose(got, old, rtol=2e-5, atol=2e-5)


def test_group_plan_sorts_stably_with_padding_last():
    route = jnp.asarray([2, -1, 0, 2, 1, -1, 0, 2], jnp.int32)
    order, starts, counts = (np.asarray(a) for a in group_plan(route, 4))
    np.testing.assert_array_equal(order, [2, 6, 4, 0, 3, 7, 1, 5])
    np.testing.assert_array_equal(counts, [2, 1, 3, 0])
    np.testing.assert_array_equal(starts, [0, 2, 3, 6])

