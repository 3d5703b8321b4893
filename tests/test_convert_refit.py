"""The layer-by-layer least-squares refit of the down projections (convert/refit.py) against a float64
numpy reference of the same procedure."""

import numpy as np
import pytest
from flax import nnx

from readme_jax.config import ConfigError, tiny_model_config
from readme_jax.convert.refit import refit_down_projections
from readme_jax.errors import ShapeError
from readme_jax.model.llama import Llama
from tests.test_convert_calibrate import _rms, _silu
from tests.test_convert_calibrate import reference_attention as _attention


def reference_refit(arrays, cfg, groups, shared, experts, ridge):
    """float64: per layer, every group's sequences through the refit-so-far model, one joint solve."""
    a = {k: np.asarray(v, np.float64) for k, v in arrays.items() if k != "layers"}
    lp = {k: np.asarray(v, np.float64) for k, v in arrays["layers"].items()}
    E = experts.shape[1]
    streams = [[a["embed"][row] for row in g] for g in groups]
    out_s = np.zeros((*shared.shape, cfg.d_model))
    out_e = np.zeros((*experts.shape, cfg.d_model))
    for l in range(cfg.n_layers):
        s0 = shared[l][shared[l] >= 0]
        se = [experts[l, e][experts[l, e] >= 0] for e in range(E)]
        cols = [(0, s0)] + [(e + 1, x) for e, x in enumerate(se)]
        off = np.cumsum([0] + [len(c) for _, c in cols])
        A, B = np.zeros((off[-1], off[-1])), np.zeros((off[-1], cfg.d_model))
        mids = []
        for e, seqs in enumerate(streams):
            x1 = [_attention(x, lp, l, cfg) for x in seqs]
            hid = np.concatenate([_silu(_rms(x, lp["ffn_norm"][l], cfg.norm_eps) @ lp["wg"][l])
                                  * (_rms(x, lp["ffn_norm"][l], cfg.norm_eps) @ lp["wu"][l]) for x in x1])
            y = hid @ lp["wd"][l]
            pos = np.concatenate([np.arange(off[0], off[1]), np.arange(off[e + 1], off[e + 2])]).astype(int)
            idx = np.concatenate([s0, se[e]]).astype(int)
            A[np.ix_(pos, pos)] += hid[:, idx].T @ hid[:, idx] / len(hid)
            B[pos] += hid[:, idx].T @ y / len(hid)
            mids.append((x1, hid, idx, pos))
        W = np.linalg.solve(A + ridge * np.mean(np.diag(A)) * np.eye(len(A)), B)
        for e, (x1, hid, idx, pos) in enumerate(mids):
            T = x1[0].shape[0]
            new = hid[:, idx] @ W[pos]
            streams[e] = [x + new[i * T:(i + 1) * T] for i, x in enumerate(x1)]
        out_s[l, :len(s0)] = W[:len(s0)]
        for e in range(E):
            out_e[l, e, :len(se[e])] = W[off[e + 1]:off[e + 2]]
    return out_s, out_e


@pytest.fixture(scope="module")
def model():
    cfg = tiny_model_config(n_layers=2, ffn_dim=24)
    arrays = Llama(cfg, rngs=nnx.Rngs(3)).arrays()
    arrays["embed"] = arrays["embed"] * 30.0  # unit-scale activations
    return cfg, arrays


def _layout(rng, L, F, E, p, r):
    shared = np.full((L, p), -1, np.int32)
    experts = np.full((L, E, r), -1, np.int32)
    for l in range(L):
        perm = rng.permutation(F)
        ps = p - l  # the second layer has one shared channel less: a padded column
        shared[l, :ps] = np.sort(perm[:ps])
        rest = perm[ps:]
        for e in range(E):
            k = r - (e + l) % 2  # some experts padded too
            experts[l, e, :k] = np.sort(rng.choice(rest, k, replace=False))
    return shared, experts


def test_refit_matches_float64_sequential_reference(model):
    cfg, arrays = model
    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    shared, experts = _layout(rng, cfg.n_layers, cfg.ffn_dim, 2, 6, 5)
    groups = [rng.integers(0, cfg.vocab_size, (3, 7)), rng.integers(0, cfg.vocab_size, (2, 9))]
    got = refit_down_projections(arrays, cfg, groups, shared, experts, ridge=1e-2)
    ref_s, ref_e = reference_refit(arrays, cfg, groups, shared, experts, 1e-2)
    scale = np.abs(ref_e).max()
    np.testing.assert_allclose(got["shared_wd"], ref_s, atol=2e-3 * scale, rtol=2e-3)
    np.testing.assert_allclose(got["wd"], ref_e, atol=2e-3 * scale, rtol=2e-3)
    assert (got["shared_wd"][1, 5:] == 0).all()  # padding rows stay zero
    assert (got["wd"][experts < 0] == 0).all()


def test_keeping_every_channel_gives_back_the_dense_down_projection(model):
    cfg, arrays = model
    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    shared = np.tile(np.arange(cfg.ffn_dim, dtype=np.int32), (cfg.n_layers, 1))
    got = refit_down_projections(arrays, cfg, [rng.integers(0, cfg.vocab_size, (4, 16))], shared, None, ridge=1e-9)
    assert set(got) == {"shared_wd"}
    want = np.asarray(arrays["layers"]["wd"])
    np.testing.assert_allclose(got["shared_wd"], want, atol=5e-3 * np.abs(want).max())


def test_refit_lowers_the_error_of_the_cut_ffn(model):
    """On the first layer's calibration tokens (same input for both), the refit rows reproduce the dense FFN
    output better than the plain cut's dense rows."""
    cfg, arrays = model
    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    keep = np.sort(rng.permutation(cfg.ffn_dim)[:10]).astype(np.int32)
    shared = np.tile(keep, (cfg.n_layers, 1))
    toks = rng.integers(0, cfg.vocab_size, (4, 12))
    got = refit_down_projections(arrays, cfg, [toks], shared, None, ridge=1e-6)
    lp = {k: np.asarray(v, np.float64) for k, v in arrays["layers"].items()}
    x = [np.asarray(arrays["embed"], np.float64)[row] for row in toks]
    h = np.concatenate([_rms(_attention(r, lp, 0, cfg), lp["ffn_norm"][0], cfg.norm_eps) for r in x])
    hid = _silu(h @ lp["wg"][0]) * (h @ lp["wu"][0])
    y = hid @ lp["wd"][0]
    cut = hid[:, keep] @ lp["wd"][0][keep]
    refit = hid[:, keep] @ got["shared_wd"][0]
    assert np.linalg.norm(refit - y) < 0.9 * np.linalg.norm(cut - y)


def test_refit_errors(model):
    cfg, arrays = model
    shared = np.zeros((cfg.n_layers, 2), np.int32)
    experts = np.zeros((cfg.n_layers, 2, 2), np.int32)
    toks = np.zeros((1, 4), np.int32)
    with pytest.raises(ShapeError, match="2 experts"):
        refit_down_projections(arrays, cfg, [toks], shared, experts)
    with pytest.raises(ShapeError, match="channel indices"):
        refit_down_projections(arrays, cfg, [toks], None, None)
    with pytest.raises(ConfigError, match="refit_ridge"):
        refit_down_projections(arrays, cfg, [toks], shared, None, ridge=0.0)


def test_block_solve_equals_a_dense_solve():
    from readme_jax.convert.refit import solve_blocks

    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    off = np.cumsum([0, 7, 4, 0, 5])  # shared 7, experts of 4, 0 (all padding) and 5 rows
    n = off[-1]
    A = np.zeros((n, n))
    for e in range(1, len(off) - 1):  # the refit's sparsity: each expert block touches the shared block only
        idx = np.r_[0:off[1], off[e]:off[e + 1]]
        m = rng.normal(size=(len(idx), len(idx)))
        A[np.ix_(idx, idx)] += m @ m.T + np.eye(len(idx))
    B = rng.normal(size=(n, 3))
    np.testing.assert_allclose(solve_blocks(A, B, off), np.linalg.solve(A, B), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(solve_blocks(A[:7, :7], B[:7], np.array([0, 7])), np.linalg.solve(A[:7, :7], B[:7]))
