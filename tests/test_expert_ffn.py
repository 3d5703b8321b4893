"""expert_ffn (reference / xla impls) and kernels.grouping against a float64 numpy oracle."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from readme_jax.errors import ShapeError
from readme_jax.kernels.grouping import group_sizes, max_tiles, sort_by_expert, tile_layout
from readme_jax.ops import expert_ffn

SEED = int.from_bytes(os.urandom(4), "little")  # fresh data every run; printed on failure


def np_ffn(x, e, wg, wu, wd):
    """float64 per-token oracle; ids outside [0, E) give a zero row."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    y = np.zeros((x.shape[0], wd.shape[2]))
    for t in range(x.shape[0]):
        k = int(e[t])
        if 0 <= k < wg.shape[0]:
            g, u = x[t] @ wg[k], x[t] @ wu[k]
            y[t] = (g / (1 + np.exp(-g)) * u) @ wd[k]
    return y


def np_grads(x, e, wg, wu, wd, gy):
    """float64 gradients of sum(y * gy) w.r.t. x, wg, wu, wd."""
    x, wg, wu, wd, gy = (np.asarray(a, np.float64) for a in (x, wg, wu, wd, gy))
    gx, gwg, gwu, gwd = np.zeros_like(x), np.zeros_like(wg), np.zeros_like(wu), np.zeros_like(wd)
    for t in range(x.shape[0]):
        k = int(e[t])
        if not 0 <= k < wg.shape[0]:
            continue
        g, u = x[t] @ wg[k], x[t] @ wu[k]
        s = 1 / (1 + np.exp(-g))
        h = g * s * u
        gh = wd[k] @ gy[t]
        gwd[k] += np.outer(h, gy[t])
        gg = gh * u * (s * (1 + g * (1 - s)))
        gu = gh * g * s
        gwg[k] += np.outer(x[t], gg)
        gwu[k] += np.outer(x[t], gu)
        gx[t] = wg[k] @ gg + wu[k] @ gu
    return gx, gwg, gwu, gwd


def make(rng, T, D, F, E, dtype=jnp.float32, ids=None):
    x = rng.standard_normal((T, D))
    wg = rng.standard_normal((E, D, F)) / np.sqrt(D)
    wu = rng.standard_normal((E, D, F)) / np.sqrt(D)
    wd = rng.standard_normal((E, F, D)) / np.sqrt(F)
    e = rng.integers(0, E, T) if ids is None else np.asarray(ids)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), jnp.asarray(e, jnp.int32), cast(wg), cast(wu), cast(wd)


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


T_FIX, E_FIX = 24, 5  # hypothesis cases share one shape (one compile per variant)


def ids_from_sizes(rng, sizes, T=T_FIX):
    """Shuffled ids with sizes[k] tokens of expert k; the rest of the T tokens get id -1 (dropped)."""
    ids = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)] + [np.full(T - sum(sizes), -1)])
    return rng.permutation(ids.astype(np.int32))


# Group sizes over E_FIX experts, sum <= T_FIX: empty groups, all dropped, one group with everything.
sizes_strategy = st.lists(st.integers(0, 12), min_size=E_FIX, max_size=E_FIX).filter(lambda s: sum(s) <= T_FIX)
EDGE_SIZES = [[T_FIX, 0, 0, 0, 0], [0, 0, 0, 0, T_FIX], [0] * E_FIX, [1, 0, 0, 0, 0]]

# (impl, impl_kw): every impl and xla strategy; tm=2 forces groups spanning several tiles.
VARIANTS = [("reference", {}), ("xla", {}), ("xla", {"strategy": "ragged"}),
            ("xla", {"strategy": "tiles", "tm": 2}), ("xla", {"strategy": "tiles", "tm": 4})]
VARIANT_IDS = ["reference", "xla", "xla-ragged", "xla-tiles2", "xla-tiles4"]
variants = pytest.mark.parametrize("impl, kw", VARIANTS, ids=VARIANT_IDS)
_JIT = {}


def jitted(kind, impl, kw):
    """One jitted forward / gradient function per variant (cached: hypothesis reuses the compile)."""
    key = (kind, impl, tuple(sorted(kw.items())))
    if key not in _JIT:
        if kind == "fwd":
            _JIT[key] = jax.jit(lambda x, e, wg, wu, wd: expert_ffn(x, e, wg, wu, wd, impl=impl, **kw))
        else:
            loss = lambda x, e, wg, wu, wd, gy: jnp.sum(expert_ffn(x, e, wg, wu, wd, impl=impl, **kw) * gy)  # noqa: E731
            _JIT[key] = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4)))
    return _JIT[key]


def check_forward(impl, kw, ids, salt):
    rng = np.random.default_rng([SEED, salt])
    x, e, wg, wu, wd = make(rng, len(ids), 8, 12, E_FIX, ids=ids)
    y = jitted("fwd", impl, kw)(x, e, wg, wu, wd)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    assert rel_err(y, np_ffn(x, e, wg, wu, wd)) < 1e-5, (SEED, salt, ids)


def check_grads(impl, kw, ids, salt):
    rng = np.random.default_rng([SEED, salt])
    x, e, wg, wu, wd = make(rng, len(ids), 8, 12, E_FIX, ids=ids)
    gy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    got = jitted("grad", impl, kw)(x, e, wg, wu, wd, gy)
    want = np_grads(x, e, wg, wu, wd, gy)
    for name, g, w in zip(("x", "wg", "wu", "wd"), got, want):
        if np.linalg.norm(w) == 0:
            assert np.all(np.asarray(g) == 0), (name, SEED, salt, ids)
        else:
            assert rel_err(g, w) < 1e-5, (name, SEED, salt, ids)


@variants
@settings(max_examples=12, deadline=None)
@given(sizes=sizes_strategy, salt=st.integers(0, 2**31 - 1))
def test_forward_matches_numpy_f32(impl, kw, sizes, salt):
    check_forward(impl, kw, ids_from_sizes(np.random.default_rng(salt), sizes), salt)


@variants
@settings(max_examples=8, deadline=None)
@given(sizes=sizes_strategy, salt=st.integers(0, 2**31 - 1))
def test_grads_match_numpy(impl, kw, sizes, salt):
    check_grads(impl, kw, ids_from_sizes(np.random.default_rng(salt), sizes), salt)


@variants
@pytest.mark.parametrize("sizes", EDGE_SIZES, ids=["all-first", "all-last", "all-dropped", "one"])
def test_edge_group_sizes(impl, kw, sizes):
    ids = ids_from_sizes(np.random.default_rng(SEED), sizes)
    check_forward(impl, kw, ids, 1)
    check_grads(impl, kw, ids, 2)


@variants
def test_single_token(impl, kw):
    for k in range(E_FIX):
        check_forward(impl, kw, np.array([k], np.int32), k)
    check_grads(impl, kw, np.array([E_FIX - 1], np.int32), 7)


@variants
@pytest.mark.parametrize("T", [1, 33])
def test_forward_bf16(impl, kw, T):
    rng = np.random.default_rng([SEED, T])
    x, e, wg, wu, wd = make(rng, T, 16, 24, 3, dtype=jnp.bfloat16)
    y = expert_ffn(x, e, wg, wu, wd, impl=impl, **kw)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, np_ffn(x, e, wg, wu, wd)) < 1e-2, SEED


@variants
def test_traced_out_of_range_ids_are_dropped(impl, kw):
    rng = np.random.default_rng(SEED)
    ids = np.array([0, -1, 2, 3, 1, 7, 2], np.int32)  # E=3: -1, 3, 7 are dropped
    x, e, wg, wu, wd = make(rng, len(ids), 8, 12, 3, ids=ids)
    f = jax.jit(lambda *a: expert_ffn(*a, impl=impl, **kw))
    y = np.asarray(f(x, e, wg, wu, wd))
    want = np_ffn(x, ids, wg, wu, wd)
    assert np.all(y[[1, 3, 5]] == 0.0)
    assert rel_err(y, want) < 1e-5
    gx = jax.jit(jax.grad(lambda x, e: jnp.sum(expert_ffn(x, e, wg, wu, wd, impl=impl, **kw) ** 2)))(x, e)
    assert np.all(np.asarray(gx)[[1, 3, 5]] == 0.0) and np.any(np.asarray(gx)[0] != 0)


def test_leading_batch_dims():
    rng = np.random.default_rng(SEED)
    x, e, wg, wu, wd = make(rng, 12, 8, 12, 3)
    y = expert_ffn(x.reshape(3, 4, 8), e.reshape(3, 4), wg, wu, wd)
    assert y.shape == (3, 4, 8)
    assert rel_err(y.reshape(12, 8), np_ffn(x, e, wg, wu, wd)) < 1e-5


def test_grouping_metadata():
    rng = np.random.default_rng(SEED)
    ids = rng.integers(-2, 6, 40).astype(np.int32)  # E=4: -2, -1, 4, 5 are dropped
    meta = jax.jit(sort_by_expert, static_argnums=1)(jnp.asarray(ids), 4)
    order, inv = np.asarray(meta.order_T), np.asarray(meta.inv_T)
    want_sizes = np.array([(ids == k).sum() for k in range(4)])
    np.testing.assert_array_equal(np.asarray(meta.sizes_E), want_sizes)
    np.testing.assert_array_equal(np.asarray(group_sizes(jnp.asarray(ids), 4)), want_sizes)
    np.testing.assert_array_equal(np.asarray(meta.offsets_E1), np.concatenate([[0], np.cumsum(want_sizes)]))
    np.testing.assert_array_equal(order[inv], np.arange(40))
    for k in range(4):  # group k holds exactly the tokens of expert k, in original order
        grp = order[meta.offsets_E1[k]:meta.offsets_E1[k + 1]]
        np.testing.assert_array_equal(grp, np.flatnonzero(ids == k))
    assert set(order[want_sizes.sum():]) == set(np.flatnonzero((ids < 0) | (ids >= 4)))


_layout = jax.jit(tile_layout, static_argnums=(1, 2))


@settings(max_examples=20, deadline=None)
@given(ids=st.lists(st.integers(-1, 4), min_size=30, max_size=30), tm=st.sampled_from([1, 2, 3, 8, 64]))
def test_tile_layout(ids, tm):
    ids = np.asarray(ids, np.int32)
    E, T = 4, len(ids)
    m = _layout(jnp.asarray(ids), E, tm)
    row_src, pos, tile_e = np.asarray(m.row_src_P), np.asarray(m.pos_T), np.asarray(m.tile_expert_N)
    N = len(tile_e)
    assert len(row_src) == N * tm and N == max_tiles(T, E, tm)
    sizes = np.array([(ids == k).sum() for k in range(E)])
    assert int(m.num_tiles) == sum(-(-n // tm) for n in sizes) <= N
    for t in range(T):
        if 0 <= ids[t] < E:  # a kept token sits in a tile of its own expert, and maps back to itself
            assert row_src[pos[t]] == t and tile_e[pos[t] // tm] == ids[t]
        else:
            assert pos[t] == N * tm
    real = row_src < T
    assert real.sum() == sizes.sum() and len(set(row_src[real])) == sizes.sum()
    rows = np.asarray(m.tile_rows_N)
    np.testing.assert_array_equal(rows, real.reshape(N, tm).sum(1))
    used = int(m.num_tiles)
    assert np.all(np.diff(tile_e) >= 0) and (used == 0 or np.all(tile_e[used:] == tile_e[used - 1]))


# ----------------------------------------------------------------------------- bad inputs


def _good(rng):
    return make(rng, 5, 8, 12, 3)


@pytest.mark.parametrize("case, match", [
    ("wu_shape", r"wu shape \(3, 8, 10\) disagrees with wg shape \(3, 8, 12\)"),
    ("wd_shape", r"wd shape \(3, 8, 12\) disagrees with wg shape \(3, 8, 12\).*\(3, 12, 8\)"),
    ("x_dim", r"x shape \(5, 9\) has model dim 9 but wg shape \(3, 8, 12\) has D=8"),
    ("len", r"expert ids shape \(4,\) does not match x shape \(5, 8\)"),
    ("float_ids", r"expert ids must be integers, got dtype float32"),
    ("oob_high", r"expert id 3 is out of range \[0, 3\) \(E=3"),
    ("oob_neg", r"expert id -1 is out of range \[0, 3\)"),
    ("impl", r"impl must be one of .* got 'cuda'"),
    ("strategy", r"xla strategy must be one of .* got 'dense'"),
])
def test_bad_inputs_raise_shape_error(case, match):
    rng = np.random.default_rng(SEED)
    x, e, wg, wu, wd = _good(rng)
    impl = "xla"
    if case == "wu_shape":
        wu = wu[:, :, :10]
    elif case == "wd_shape":
        wd = jnp.swapaxes(wd, 1, 2)
    elif case == "x_dim":
        x = jnp.concatenate([x, x[:, :1]], axis=1)
    elif case == "len":
        e = e[:4]
    elif case == "float_ids":
        e = e.astype(jnp.float32)
    elif case == "oob_high":
        e = e.at[2].set(3)
    elif case == "oob_neg":
        e = e.at[0].set(-1)
    elif case == "impl":
        impl = "cuda"
    kw = {"strategy": "dense"} if case == "strategy" else {}
    with pytest.raises(ShapeError, match=match):
        expert_ffn(x, e, wg, wu, wd, impl=impl, **kw)
