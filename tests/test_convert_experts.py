"""Channel selection, permanent expert, expert extraction (fixed/split), MoE params, pruned dense."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from readme_jax.config import tiny_model_config
from readme_jax.convert.experts import (expert_overlap, expert_width, extract_experts, layout_cost,
                                        moe_arrays_from_dense, permanent_channels, permanent_sizes,
                                        pruned_dense_arrays, select_channels)
from readme_jax.errors import ConfigError, ShapeError
from readme_jax.model import decoder, layers
from readme_jax.model.llama import Llama
from readme_jax.model.moe import routed_ffn


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu64(x, wg, wu, wd, keep=None):
    h = _silu(x @ wg.astype(np.float64)) * (x @ wu.astype(np.float64))
    if keep is not None:
        h = h * keep
    return h @ wd.astype(np.float64)


def _ref_select(score_F, k):
    return sorted(range(len(score_F)), key=lambda c: (-score_F[c], c))[:k]


@pytest.fixture(scope="module")
def dense():
    cfg = tiny_model_config()
    return cfg, Llama(cfg, rngs=nnx.Rngs(0)).arrays()


def _random_masks(rng, N, L, F, r):
    # integer scores make ties common, exercising the tie-break rule
    return select_channels(rng.integers(0, 6, (N, L, F)).astype(np.float64), r)


# ----------------------------------------------------------------------------- selection


def test_expert_width_and_bad_ratios():
    assert expert_width(1536, 0.5) == 768
    assert expert_width(48, 0.5) == 24
    assert expert_width(5, 0.5) == 3  # halves round up
    assert expert_width(10, 0.3) == 3
    assert expert_width(7, 1.0) == 7
    for r in (0, 0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"expert ratio r must lie in \(0, 1\], got"):
            expert_width(48, r)
    with pytest.raises(ConfigError, match=r"must be a number in \(0, 1\], got nan"):
        expert_width(48, float("nan"))
    with pytest.raises(ConfigError, match=r"keeps round\(r\*F\)=0 of F=48 channels; need at least 1"):
        expert_width(48, 0.01)


def test_select_channels_matches_sorted_reference():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, (3, 2, 17)).astype(np.float64)
    m = select_channels(s, 0.4)
    fe = expert_width(17, 0.4)
    assert m.shape == s.shape and m.dtype == np.bool_
    assert (m.sum(-1) == fe).all()
    for n in range(3):
        for l in range(2):
            assert sorted(np.nonzero(m[n, l])[0].tolist()) == sorted(_ref_select(s[n, l].tolist(), fe))
    np.testing.assert_array_equal(select_channels(s, 0.4), m)  # deterministic
    with pytest.raises(ConfigError, match=r"lie in \(0, 1\], got 0"):
        select_channels(s, 0)
    with pytest.raises(ConfigError, match=r"lie in \(0, 1\], got 1.5"):
        select_channels(s, 1.5)
    with pytest.raises(ShapeError, match=r"must be \[n_domains, n_layers, ffn_dim\], got shape \(2, 17\)"):
        select_channels(s[0], 0.5)
    bad = s.copy()
    bad[1, 0, 3] = np.nan
    with pytest.raises(ShapeError, match=r"inf/nan at \(domain, layer\) \[\(1, 0\)\]"):
        select_channels(bad, 0.5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.floats(0.05, 1.0), st.integers(0, 2**31))
def test_select_channels_property(N, L, F, r, seed):
    try:
        fe = expert_width(F, r)
    except ConfigError:
        return
    s = np.random.default_rng(seed).integers(0, 3, (N, L, F)).astype(np.float64)
    m = select_channels(s, r)
    assert (m.sum(-1) == fe).all()
    # every kept channel scores >= every dropped one; on ties the kept index is lower
    for n in range(N):
        for l in range(L):
            kept, drop = np.nonzero(m[n, l])[0], np.nonzero(~m[n, l])[0]
            if len(drop):
                worst = min(kept, key=lambda c: (s[n, l, c], -c))
                best_drop = max(drop, key=lambda c: (s[n, l, c], -c))
                assert (s[n, l, worst], -worst) > (s[n, l, best_drop], -best_drop)


def test_permanent_and_overlap():
    rng = np.random.default_rng(1)
    m = _random_masks(rng, 4, 3, 20, 0.5)
    perm = permanent_channels(m)
    for l in range(3):
        sets = [set(np.nonzero(m[e, l])[0]) for e in range(4)]
        assert set(np.nonzero(perm[l])[0]) == set.intersection(*sets)
        assert permanent_sizes(m)[l] == len(set.intersection(*sets))
        ov = expert_overlap(m)[l]
        for a in range(4):
            for b in range(4):
                assert ov[a, b] == pytest.approx(len(sets[a] & sets[b]) / 10)
        np.testing.assert_allclose(np.diag(ov), 1.0)
    with pytest.raises(ShapeError, match="same number"):
        permanent_channels(np.array([[[True, False]], [[True, True]]]))
    with pytest.raises(ShapeError, match=r"must be bool \[n_experts, n_layers, ffn_dim\]"):
        permanent_channels(np.ones((2, 3, 4)))


# ----------------------------------------------------------------------------- extraction


def test_fixed_experts_equal_masked_dense(dense):
    cfg, arrays = dense
    rng = np.random.default_rng(2)
    E, L, F, D = 3, cfg.n_layers, cfg.ffn_dim, cfg.d_model
    m = _random_masks(rng, E, L, F, 0.5)
    ex = extract_experts(arrays, m)
    fe = expert_width(F, 0.5)
    assert ex["wg"].shape == ex["wu"].shape == (L, E, D, fe)
    assert ex["wd"].shape == (L, E, fe, D) and ex["channel_index"].shape == (L, E, fe)
    assert ex["wg"].dtype == np.asarray(arrays["layers"]["wg"]).dtype
    perm = permanent_channels(m)
    x = rng.standard_normal((5, D))
    lw = {k: np.asarray(arrays["layers"][k]) for k in ("wg", "wu", "wd")}
    for l in range(L):
        for e in range(E):
            idx = ex["channel_index"][l, e]
            assert (np.diff(idx) > 0).all() and set(idx) == set(np.nonzero(m[e, l])[0])
            assert set(np.nonzero(perm[l])[0]) <= set(idx)  # permanent channels included
            got = _swiglu64(x, ex["wg"][l, e], ex["wu"][l, e], ex["wd"][l, e])
            want = _swiglu64(x, lw["wg"][l], lw["wu"][l], lw["wd"][l], keep=m[e, l])
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    again = extract_experts(arrays, m)
    for k in ex:
        np.testing.assert_array_equal(again[k], ex[k])


def test_r_one_gives_whole_ffn(dense):
    cfg, arrays = dense
    s = np.random.default_rng(3).standard_normal((2, cfg.n_layers, cfg.ffn_dim))
    m = select_channels(s, 1.0)
    ex = extract_experts(arrays, m)
    np.testing.assert_array_equal(ex["channel_index"], np.broadcast_to(np.arange(cfg.ffn_dim), (cfg.n_layers, 2, cfg.ffn_dim)))
    for e in range(2):
        np.testing.assert_array_equal(ex["wg"][:, e], np.asarray(arrays["layers"]["wg"]))
        np.testing.assert_array_equal(ex["wd"][:, e], np.asarray(arrays["layers"]["wd"]))
    assert permanent_sizes(m).tolist() == [cfg.ffn_dim] * cfg.n_layers


@pytest.mark.parametrize("layout", ["split", "split_min"])
def test_split_layouts_equal_masked_dense(dense, layout):
    cfg, arrays = dense
    rng = np.random.default_rng(4)
    E, L, F, D = 3, cfg.n_layers, cfg.ffn_dim, cfg.d_model
    # correlated domain scores so layers have a sizeable, layer-dependent permanent part
    base = rng.standard_normal((1, L, F)) * np.array([3.0, 0.5])[None, :, None]
    m = select_channels(base + rng.standard_normal((E, L, F)), 0.5)
    p_L = permanent_sizes(m)
    assert p_L.min() != p_L.max()  # padding (split) / spill-over (split_min) is exercised
    fe = expert_width(F, 0.5)
    sp = extract_experts(arrays, m, layout=layout)
    s_L = p_L if layout == "split" else np.full(L, p_L.min())
    P, R = int(s_L.max()), int(fe - s_L.min())
    assert sp["shared_wg"].shape == (L, D, P) and sp["shared_wd"].shape == (L, P, D)
    assert sp["wg"].shape == (L, E, D, R) and sp["wd"].shape == (L, E, R, D)
    np.testing.assert_array_equal(sp["shared_count"], s_L)
    np.testing.assert_array_equal(sp["expert_count"], fe - s_L)
    perm = permanent_channels(m)
    x = rng.standard_normal((4, D))
    lw = {k: np.asarray(arrays["layers"][k]) for k in ("wg", "wu", "wd")}
    for l in range(L):
        sidx = sp["shared_index"][l]
        assert (sidx[s_L[l]:] == -1).all() and (sp["shared_wg"][l][:, s_L[l]:] == 0).all()
        assert set(sidx[sidx >= 0]) <= set(np.nonzero(perm[l])[0])
        for e in range(E):
            eidx = sp["channel_index"][l, e]
            assert (eidx[fe - s_L[l]:] == -1).all() and (sp["wd"][l, e][fe - s_L[l]:] == 0).all()
            shared, own = set(sidx[sidx >= 0]), set(eidx[eidx >= 0])
            assert not shared & own and shared | own == set(np.nonzero(m[e, l])[0])
            got = (_swiglu64(x, sp["shared_wg"][l], sp["shared_wu"][l], sp["shared_wd"][l])
                   + _swiglu64(x, sp["wg"][l, e], sp["wu"][l, e], sp["wd"][l, e]))
            want = _swiglu64(x, lw["wg"][l], lw["wu"][l], lw["wd"][l], keep=m[e, l])
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="layout must be 'fixed', 'split' or 'split_min', got 'ragged'"):
        extract_experts(arrays, m, layout="ragged")


def test_layout_cost_counts():
    # 2 experts, 2 layers, F=4, F_e=2; layer 0 permanent {0}, layer 1 permanent {} .
    m = np.array([[[1, 1, 0, 0], [1, 1, 0, 0]],
                  [[1, 0, 1, 0], [0, 0, 1, 1]]], bool)
    c = layout_cost(m, k=2, d_model=10, bytes_per_param=2)
    assert c["permanent_per_layer"] == [1, 0]
    per = 3 * 10 * 2
    assert c["bytes"]["fixed"] == 2 * 2 * 2 * per  # L * k * F_e
    assert c["bytes"]["split_exact"] == ((1 + 2 * 1) + (0 + 2 * 2)) * per
    assert c["bytes"]["split"] == 2 * (1 + 2 * 2) * per  # P_max=1, R_max=2
    assert c["bytes"]["split_min"] == 2 * (0 + 2 * 2) * per  # P_min=0
    assert c["flops_per_token"]["fixed"] == 2 * 3 * 10 * 2 * 2
    assert c["flops_per_token"]["split"] == 2 * 3 * 10 * 2 * 3
    assert c["flops_per_token"]["split_min"] == c["flops_per_token"]["fixed"]
    with pytest.raises(ConfigError, match=r"k must be in \[1, 2\] experts, got 3"):
        layout_cost(m, k=3, d_model=10)


def test_masks_disagreeing_with_model(dense):
    cfg, arrays = dense
    m = select_channels(np.random.default_rng(5).standard_normal((2, cfg.n_layers, cfg.ffn_dim + 1)), 0.5)
    with pytest.raises(ShapeError, match=r"masks/stats are \[.., L=2, F=49\] but the dense model has L=2, F=48"):
        extract_experts(arrays, m)
    with pytest.raises(ShapeError, match="F=49.*dense model has L=2, F=48"):
        moe_arrays_from_dense(arrays, m)


# ----------------------------------------------------------------------------- MoE params and pruned dense


@pytest.mark.parametrize("layout", ["fixed", "split"])
def test_moe_arrays_forward_equals_masked_dense(dense, layout):
    cfg, arrays = dense
    rng = np.random.default_rng(6)
    E = 3
    m = _random_masks(rng, E, cfg.n_layers, cfg.ffn_dim, 0.5)
    m[:, :, :5] = True  # some channels every expert keeps (the shared part of the split layout)
    m[:, 0, 5:7] = True  # layers with different shared counts: padding in the split layout
    m[:, 1, 7] = True
    for e in range(E):  # keep F_e channels per (expert, layer): drop surplus non-shared ones
        for layer in range(cfg.n_layers):
            extra = np.flatnonzero(m[e, layer] & ~m.all(0)[layer])
            n_drop = m[e, layer].sum() - expert_width(cfg.ffn_dim, 0.5)
            m[e, layer, extra[:n_drop]] = False
            m[e, layer, np.flatnonzero(~m[e, layer])[:max(0, -n_drop)]] = True
    params, meta = moe_arrays_from_dense(arrays, m, domains=["a", "b", "c"], r=0.5, layout=layout)
    shared_keys = {"shared_wg", "shared_wu", "shared_wd"} if layout == "split" else set()
    assert set(params) == set(arrays) and set(params["layers"]) == set(arrays["layers"]) | shared_keys
    for k in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm"):  # attention and norms shared
        assert params["layers"][k] is arrays["layers"][k]
    assert params["embed"] is arrays["embed"]
    fe = expert_width(cfg.ffn_dim, 0.5)
    P = m.all(0).sum(-1)  # shared channels per layer
    width = fe if layout == "fixed" else fe - P.min()
    assert params["layers"]["wg"].shape == (cfg.n_layers, E, cfg.d_model, width)
    if layout == "split":
        assert params["layers"]["shared_wg"].shape == (cfg.n_layers, cfg.d_model, P.max())
    assert meta["domains"] == ["a", "b", "c"] and meta["r"] == 0.5 and meta["expert_width"] == fe
    assert meta["n_experts"] == E and meta["ffn_dim"] == cfg.ffn_dim and meta["layout"] == layout
    np.testing.assert_array_equal(meta["permanent"], permanent_channels(m))
    assert meta["channel_index"].shape == (cfg.n_layers, E, width)

    # one MoE layer vs the float64 numpy masked dense FFN, every expert, on fresh random inputs
    h = rng.standard_normal((11, cfg.d_model)).astype(np.float32)
    route = rng.integers(0, E, 11)
    for layer in range(cfg.n_layers):
        lp = {k: v[layer] for k, v in params["layers"].items()}
        got, _ = routed_ffn("reference")(lp, jnp.asarray(h)[None], jnp.asarray(route, jnp.int32)[None])
        wg, wu, wd = (np.asarray(arrays["layers"][k][layer], np.float64) for k in ("wg", "wu", "wd"))
        g, u = h.astype(np.float64) @ wg, h.astype(np.float64) @ wu
        hid = g / (1 + np.exp(-g)) * u * m[route, layer]
        np.testing.assert_allclose(np.asarray(got[0], np.float64), hid @ wd, rtol=2e-4, atol=2e-5)

    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)), jnp.int32)
    for e in range(E):  # the whole decoder: MoE forced to expert e == dense with e's channels only
        def masked_ffn(lp, h, ctx):
            hid = layers.ffn_hidden(h, lp["wg"], lp["wu"]) * lp["keep"]
            return jnp.dot(hid, lp["wd"]), None

        got, _, _ = decoder.forward(params, cfg, tokens, ffn=routed_ffn("reference"),
                                    ffn_ctx=jnp.full(tokens.shape, e, jnp.int32))
        dparams = {**arrays, "layers": {**arrays["layers"], "keep": jnp.asarray(m[e], jnp.float32)}}
        want, _, _ = decoder.forward(dparams, cfg, tokens, ffn=masked_ffn)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)

    with pytest.raises(ShapeError, match="2 domain names for 3 expert masks"):
        moe_arrays_from_dense(arrays, m, domains=["a", "b"])
    with pytest.raises(ConfigError, match=r"r=0.25 gives 12 channels of F=48, but the masks keep 24"):
        moe_arrays_from_dense(arrays, m, r=0.25)
    with pytest.raises(ShapeError, match="full dense param dict with a 'layers' group"):
        moe_arrays_from_dense(arrays["layers"], m)


def test_pruned_dense_keeps_top_pooled_channels(dense):
    cfg, arrays = dense
    rng = np.random.default_rng(7)
    pooled = rng.integers(0, 8, (cfg.n_layers, cfg.ffn_dim)).astype(np.float64)
    width = 20
    params, pcfg = pruned_dense_arrays(arrays, pooled, width, cfg)
    assert pcfg.ffn_dim == width and pcfg.d_model == cfg.d_model and cfg.ffn_dim == 48
    lw = {k: np.asarray(arrays["layers"][k]) for k in ("wg", "wu", "wd")}
    for l in range(cfg.n_layers):
        keep = sorted(_ref_select(pooled[l].tolist(), width))
        np.testing.assert_array_equal(params["layers"]["wg"][l], lw["wg"][l][:, keep])
        np.testing.assert_array_equal(params["layers"]["wu"][l], lw["wu"][l][:, keep])
        np.testing.assert_array_equal(params["layers"]["wd"][l], lw["wd"][l][keep])
    Llama.from_arrays(pcfg, params)  # a valid dense model of the new width
    with pytest.raises(ConfigError, match=r"width must be an integer in \[1, 48\], got 0"):
        pruned_dense_arrays(arrays, pooled, 0, cfg)
    with pytest.raises(ConfigError, match=r"width must be an integer in \[1, 48\], got 49"):
        pruned_dense_arrays(arrays, pooled, 49, cfg)
    with pytest.raises(ShapeError, match=r"\[.., L=3, F=48\] but the dense model has L=2, F=48"):
        pruned_dense_arrays(arrays, np.zeros((3, 48)), 10, cfg)
    with pytest.raises(ShapeError, match=r"pooled stats must be \[n_layers, ffn_dim\], got shape \(48,\)"):
        pruned_dense_arrays(arrays, np.zeros(48), 10, cfg)


def test_summary_and_report_cli(dense, tmp_path, capsys):
    from readme_jax.convert.calibrate import CalibrationStats, save_stats
    from readme_jax.convert.experts import main, summarize

    cfg, _ = dense
    rng = np.random.default_rng(8)
    sums = rng.random((3, cfg.n_layers, cfg.ffn_dim))
    m = select_channels(sums / 4, 0.5)
    s = summarize(m, cfg.d_model)
    assert s["permanent_per_layer"] == permanent_sizes(m).tolist() and len(s["cost"]) == 3
    ov = expert_overlap(m)
    assert s["mean_overlap_per_layer"][1] == pytest.approx((ov[1].sum() - 3) / 6)
    prov = {"model_id": "t", "model_config": {"d_model": cfg.d_model}}
    save_stats(tmp_path / "s.npz", CalibrationStats(("a", "b", "c"), sums, np.array([4, 4, 4]), prov))
    main([str(tmp_path / "s.npz"), "--r", "0.5"])
    out = capsys.readouterr().out
    assert f"permanent channels per layer: {permanent_sizes(m).tolist()}" in out
    assert "F=48 r=0.5 -> F_e=24; L=2; D=32" in out


@pytest.mark.parametrize("layout", ["fixed", "split"])
def test_moe_backbone_loads_converted_params(dense, layout):
    """End to end: converted params in the MoE backbone == dense FFN masked by each token's expert."""
    from readme_jax.model.moe import MoEBackbone

    cfg, arrays = dense
    rng = np.random.default_rng(9)
    E = 4
    m = _random_masks(rng, E, cfg.n_layers, cfg.ffn_dim, 0.5)
    m[:, :, :3] = True  # shared by every expert (F_e grows by at most 3; masks stay equal-sized)
    counts = m.sum(-1)
    for e, layer in np.argwhere(counts > counts.min()):
        drop = np.flatnonzero(m[e, layer] & ~m.all(0)[layer])[:counts[e, layer] - counts.min()]
        m[e, layer, drop] = False
    params, meta = moe_arrays_from_dense(arrays, m, layout=layout)
    lay = params["layers"]
    moe = MoEBackbone.from_arrays(cfg, params, n_experts=E, expert_dim=lay["wg"].shape[-1], impl="reference",
                                  shared_dim=lay["shared_wg"].shape[-1] if "shared_wg" in lay else 0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    route = jnp.asarray(rng.integers(0, E, (2, 7)), jnp.int32)
    got, _ = moe(tokens, route_BT=route)

    def masked_ffn(lp, h, route_BT):
        hid = layers.ffn_hidden(h, lp["wg"], lp["wu"]) * lp["keep"][route_BT]
        return jnp.dot(hid, lp["wd"]), None

    dparams = {**arrays, "layers": {**arrays["layers"], "keep": jnp.asarray(np.swapaxes(m, 0, 1), jnp.float32)}}
    want, _, _ = decoder.forward(dparams, cfg, tokens, ffn=masked_ffn, ffn_ctx=route)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_shared_fraction_forces_a_shared_part_of_pooled_top_channels():
    rng = np.random.default_rng(int(np.random.randint(1 << 20)))
    stats = rng.random((5, 3, 40))
    pooled = stats.mean(0)
    plain = select_channels(stats, 0.5)
    np.testing.assert_array_equal(select_channels(stats, 0.5, pooled, 0.0), plain)  # 0 = today's rule
    for s in (0.25, 0.5, 0.9):
        masks = select_channels(stats, 0.5, pooled, s)
        assert (masks.sum(-1) == 20).all()  # every expert keeps exactly F_e channels
        forced = int(np.floor(s * 20 + 0.5))
        top = np.argsort(-pooled, axis=-1, kind="stable")[:, :forced]
        for l in range(3):
            assert masks[:, l, top[l]].all()  # the pooled top channels are in every expert
            # the rest of each expert is its own top channels among the others
            for n in range(5):
                rest = np.setdiff1d(np.flatnonzero(masks[n, l]), top[l])
                others = np.setdiff1d(np.arange(40), top[l])
                want = others[np.argsort(-stats[n, l, others], kind="stable")[:20 - forced]]
                np.testing.assert_array_equal(np.sort(rest), np.sort(want))
        assert (np.logical_and.reduce(masks, 0).sum(-1) >= forced).all()
    with pytest.raises(ConfigError, match="shared_fraction must lie in"):
        select_channels(stats, 0.5, pooled, 1.0)
    with pytest.raises(ShapeError, match="needs the pooled statistic"):
        select_channels(stats, 0.5, None, 0.5)
