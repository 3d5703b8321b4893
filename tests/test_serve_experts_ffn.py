"""The engine step's expert FFN (serve/engine/experts.py, plus the shared part) against a float64 numpy
per-token reference, on fresh random inputs: group sizes at every tile edge, empty experts, padding,
a split layout, several layers (the layer index picks each expert's slice)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.model.moe import shared_ffn
from readme_jax.serve.engine.experts import ROW_TILES, expert_slots, group_plan, grouped_experts


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


def _layers(rng, L, E, D, F, shared):
    """Stacked layer params ``[L, ...]`` as the backbone holds them."""
    lp = {"wg": rng.standard_normal((L, E, D, F)) * 0.3, "wu": rng.standard_normal((L, E, D, F)) * 0.3,
          "wd": rng.standard_normal((L, E, F, D)) * 0.3}
    if shared:
        lp.update(shared_wg=rng.standard_normal((L, D, shared)) * 0.3,
                  shared_wu=rng.standard_normal((L, D, shared)) * 0.3,
                  shared_wd=rng.standard_normal((L, shared, D)) * 0.3)
    return {k: jnp.asarray(v, jnp.float32) for k, v in lp.items()}


def _routes(rng, N, E, counts):
    """Routes with the given per-expert counts (the rest padding), shuffled."""
    r = np.concatenate([np.full(c, e) for e, c in enumerate(counts)] + [np.full(N - sum(counts), -1)])
    return rng.permutation(r).astype(np.int32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("N", [1, 8, 48, 96])
def test_grouped_ffn_equals_float64_per_token_reference(seed, N):
    rng = np.random.default_rng([seed, N])
    L, E, D, F = 3, 5, 12, 8
    stacks = _layers(rng, L, E, D, F, shared=6 if seed % 2 else 0)
    slots = expert_slots(stacks)
    h = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    # group sizes on both sides of every tile edge, an empty expert, and some padding
    edges = [t + d for t in ROW_TILES for d in (-1, 0, 1)] + [1, N]
    counts = np.zeros(E, int)
    left = N - rng.integers(0, min(4, N))
    for e in rng.permutation(E)[:-1]:  # one expert stays empty
        c = int(min(left, rng.choice(edges)))
        counts[e], left = c, left - c
    route = _routes(rng, N, E, counts)

    def ffn(stacks, slots, h, r, layer):
        lp = {k: v[layer] for k, v in stacks.items() if k.startswith("shared")}
        return shared_ffn(lp, h, grouped_experts(h, group_plan(r, E), slots, layer))

    f = jax.jit(ffn)
    for layer in range(L):  # the layer index is traced: each expert's slice is read in its branch
        got = np.asarray(f(stacks, slots, h, jnp.asarray(route), jnp.int32(layer)))
        want = _reference({k: v[layer] for k, v in stacks.items()}, np.asarray(h), route)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_group_plan_sorts_stably_with_padding_last():
    route = jnp.asarray([2, -1, 0, 2, 1, -1, 0, 2], jnp.int32)
    order, starts, counts = (np.asarray(a) for a in group_plan(route, 4))
    np.testing.assert_array_equal(order, [2, 6, 4, 0, 3, 7, 1, 5])
    np.testing.assert_array_equal(counts, [2, 1, 3, 0])
    np.testing.assert_array_equal(starts, [0, 2, 3, 6])

