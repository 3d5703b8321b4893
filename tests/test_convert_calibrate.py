"""Calibration statistics vs a float64 numpy reference forward; streaming, masks, resume, errors."""

import importlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
from flax import nnx

from readme_jax.config import tiny_model_config
from readme_jax.convert.calibrate import CalibrationStats, calibrate, load_stats, save_stats
from readme_jax.errors import DataError, ShapeError
from readme_jax.model.llama import Llama

# the package re-exports the function ``calibrate``, which shadows the submodule attribute
cal = importlib.import_module("readme_jax.convert.calibrate")


# ----------------------------------------------------------------------------- float64 reference


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x_TNh, theta):
    T, _, hd = x_TNh.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    f = np.arange(T)[:, None] * inv
    emb = np.concatenate([f, f], -1)[:, None, :]
    rot = np.concatenate([-x_TNh[..., hd // 2:], x_TNh[..., :hd // 2]], -1)
    return x_TNh * np.cos(emb) + rot * np.sin(emb)


def reference_attention(x, lp, l, cfg):
    """float64 ``x + attention(rms_norm(x))`` of layer ``l`` for one causal sequence ``x [T, D]``."""
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    T = x.shape[0]
    h = _rms(x, lp["attn_norm"][l], cfg.norm_eps)
    q = _rope((h @ lp["wq"][l]).reshape(T, H, hd), cfg.rope_theta)
    k = _rope((h @ lp["wk"][l]).reshape(T, K, hd), cfg.rope_theta)
    v = (h @ lp["wv"][l]).reshape(T, K, hd)
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return x + np.einsum("hts,shd->thd", p, v).reshape(T, H * hd) @ lp["wo"][l]


def reference_hidden_abs(arrays, cfg, tokens_T):
    """float64 dense forward of one sequence; returns |silu(h Wg) * (h Wu)| per layer: [L, T, F]."""
    a = {k: np.asarray(v, np.float64) for k, v in arrays.items() if k != "layers"}
    lp = {k: np.asarray(v, np.float64) for k, v in arrays["layers"].items()}
    x = a["embed"][tokens_T]
    out = []
    for l in range(cfg.n_layers):
        x = reference_attention(x, lp, l, cfg)
        h = _rms(x, lp["ffn_norm"][l], cfg.norm_eps)
        hid = _silu(h @ lp["wg"][l]) * (h @ lp["wu"][l])
        out.append(np.abs(hid))
        x = x + hid @ lp["wd"][l]
    return np.stack(out)


def reference_sums(arrays, cfg, rows):
    """Sum over all tokens of all rows (each a 1-D token array): [L, F] float64, token count."""
    per = [reference_hidden_abs(arrays, cfg, r).sum(1) for r in rows]
    return np.sum(per, axis=0), sum(len(r) for r in rows)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_model_config()
    arrays = Llama(cfg, rngs=nnx.Rngs(0)).arrays()
    rng = np.random.default_rng(1)
    # non-trivial norm weights so the reference exercises them
    arrays["layers"]["attn_norm"] = arrays["layers"]["attn_norm"] * (1 + 0.3 * rng.standard_normal(
        arrays["layers"]["attn_norm"].shape, np.float32))
    arrays["layers"]["ffn_norm"] = arrays["layers"]["ffn_norm"] * (1 + 0.3 * rng.standard_normal(
        arrays["layers"]["ffn_norm"].shape, np.float32))
    arrays["embed"] = arrays["embed"] * 30.0  # unit-scale activations
    return cfg, arrays


def _tokens(rng, cfg, B, T):
    return rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int32)


def test_stats_match_float64_reference(model):
    cfg, arrays = model
    rng = np.random.default_rng(2)
    data = {"code": [_tokens(rng, cfg, 2, 8), _tokens(rng, cfg, 2, 8)], "prose": [_tokens(rng, cfg, 3, 5)]}
    stats = calibrate(arrays, cfg, data, model_id="tiny", progress=False)
    assert stats.domains == ("code", "prose")
    assert stats.sums_NLF.shape == (2, cfg.n_layers, cfg.ffn_dim) and stats.sums_NLF.dtype == np.float64
    for n, name in enumerate(stats.domains):
        rows = [row for b in data[name] for row in b]
        ref, count = reference_sums(arrays, cfg, rows)
        assert stats.tokens_N[n] == count
        np.testing.assert_allclose(stats.sums_NLF[n], ref, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(stats.mean()[n], ref / count, rtol=2e-4, atol=1e-7)
        ref_sq = np.sum([(reference_hidden_abs(arrays, cfg, r) ** 2).sum(1) for r in rows], axis=0)
        np.testing.assert_allclose(stats.sq_sums_NLF[n], ref_sq, rtol=5e-4, atol=1e-6)
        np.testing.assert_allclose(stats.mean_sq()[n], ref_sq / count, rtol=5e-4, atol=1e-7)
    # pooled mean = all sums / all tokens
    np.testing.assert_allclose(stats.pooled_mean(), stats.sums_NLF.sum(0) / stats.tokens_N.sum())
    prov = stats.provenance
    assert prov["model_id"] == "tiny" and prov["domains"] == ["code", "prose"]
    assert prov["tokens"] == {"code": 32, "prose": 15} and prov["samples"] == {"code": 4, "prose": 3}
    assert prov["seq_lens"] == {"code": [8], "prose": [5]}
    assert prov["model_config"]["ffn_dim"] == cfg.ffn_dim


def test_streaming_equals_one_big_batch(model):
    cfg, arrays = model
    rng = np.random.default_rng(3)
    big = _tokens(rng, cfg, 6, 8)
    one = calibrate(arrays, cfg, {"d": [big]}, progress=False)
    many = calibrate(arrays, cfg, {"d": iter([big[:2], big[2:3], big[3:]])}, progress=False)
    assert one.tokens_N[0] == many.tokens_N[0] == 48
    np.testing.assert_allclose(many.sums_NLF, one.sums_NLF, rtol=1e-5)


def test_mask_excludes_right_padding(model):
    cfg, arrays = model
    rng = np.random.default_rng(4)
    toks = _tokens(rng, cfg, 3, 8)
    lengths = [8, 5, 2]
    mask = np.arange(8)[None, :] < np.array(lengths)[:, None]
    stats = calibrate(arrays, cfg, {"d": [(toks, mask)]}, progress=False)
    ref, count = reference_sums(arrays, cfg, [toks[i, :n] for i, n in enumerate(lengths)])
    assert stats.tokens_N[0] == count == 15
    np.testing.assert_allclose(stats.sums_NLF[0], ref, rtol=2e-4, atol=1e-6)


def test_step_compiles_once_per_shape(model, monkeypatch):
    cfg, arrays = model
    calls = []
    real = cal.layers.ffn_hidden
    monkeypatch.setattr(cal.layers, "ffn_hidden", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(5)
    shape = (3, 7)  # a shape no other test uses, so the jit cache is cold for it
    calibrate(arrays, cfg, {"d": [_tokens(rng, cfg, *shape)]}, progress=False)
    first = len(calls)
    assert first >= 1  # traced once
    calibrate(arrays, cfg, {"d": [_tokens(rng, cfg, *shape) for _ in range(3)]}, progress=False)
    assert len(calls) == first  # same shape: no retrace for any later batch


def test_resume_skips_finished_domains(model, tmp_path):
    cfg, arrays = model
    rng = np.random.default_rng(6)
    data = {"a": [_tokens(rng, cfg, 2, 8)], "b b/c": [_tokens(rng, cfg, 2, 8), _tokens(rng, cfg, 1, 8)]}
    full = calibrate(arrays, cfg, data, model_id="m", progress=False)

    pulled = {"a": 0, "b b/c": 0}

    def counted(name, fail_after=None):
        for i, b in enumerate(data[name]):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt("simulated crash")
            pulled[name] += 1
            yield b

    with pytest.raises(KeyboardInterrupt):
        calibrate(arrays, cfg, {"a": counted("a"), "b b/c": counted("b b/c", fail_after=1)},
                  model_id="m", partial_dir=tmp_path, progress=False)
    assert pulled == {"a": 1, "b b/c": 1}
    assert len(list(tmp_path.glob("*.npz"))) == 1  # only the finished domain was saved

    pulled = {"a": 0, "b b/c": 0}
    resumed = calibrate(arrays, cfg, {"a": counted("a"), "b b/c": counted("b b/c")},
                        model_id="m", partial_dir=tmp_path, progress=False)
    assert pulled == {"a": 0, "b b/c": 2}  # "a" was loaded, never iterated
    assert resumed.domains == full.domains
    np.testing.assert_array_equal(resumed.tokens_N, full.tokens_N)
    np.testing.assert_allclose(resumed.sums_NLF, full.sums_NLF, rtol=1e-12)
    assert resumed.provenance == full.provenance

    pulled = {"a": 0, "b b/c": 0}
    calibrate(arrays, cfg, {"a": counted("a"), "b b/c": counted("b b/c")},
              model_id="m", partial_dir=tmp_path, progress=False)
    assert pulled == {"a": 0, "b b/c": 0}

    with pytest.raises(DataError, match=r"computed with model_id='m', but this run uses 'other'"):
        calibrate(arrays, cfg, {"a": data["a"]}, model_id="other", partial_dir=tmp_path, progress=False)


def test_save_load_roundtrip_and_select(model, tmp_path):
    cfg, arrays = model
    rng = np.random.default_rng(7)
    stats = calibrate(arrays, cfg, {"x": [_tokens(rng, cfg, 1, 4)], "y": [_tokens(rng, cfg, 2, 3)]},
                      model_id="rt", progress=False)
    path = tmp_path / "sub" / "stats.npz"
    save_stats(path, stats)
    back = load_stats(path)
    assert back.domains == stats.domains and back.provenance == stats.provenance
    np.testing.assert_array_equal(back.sums_NLF, stats.sums_NLF)
    np.testing.assert_array_equal(back.sq_sums_NLF, stats.sq_sums_NLF)
    np.testing.assert_array_equal(back.tokens_N, stats.tokens_N)
    y = stats.select(["y"])
    assert y.domains == ("y",) and y.provenance["tokens"] == {"y": 6}
    np.testing.assert_array_equal(y.sums_NLF[0], stats.sums_NLF[1])
    np.testing.assert_array_equal(y.sq_sums_NLF[0], stats.sq_sums_NLF[1])
    old = CalibrationStats(stats.domains, stats.sums_NLF, stats.tokens_N, stats.provenance)  # no squared sums
    save_stats(tmp_path / "old.npz", old)
    with pytest.raises(DataError, match="no squared sums"):
        load_stats(tmp_path / "old.npz").mean_sq()
    with pytest.raises(DataError, match=r"no domain\(s\) \['z'\]"):
        stats.select(["z"])
    with pytest.raises(DataError, match="calibration stats file not found"):
        load_stats(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="unreadable or incomplete"):
        load_stats(tmp_path / "junk.npz")


def test_domain_without_tokens_is_an_error(model):
    cfg, arrays = model
    rng = np.random.default_rng(8)
    ok = [_tokens(rng, cfg, 1, 4)]
    with pytest.raises(DataError, match=r"domain 'empty' produced no calibration tokens"):
        calibrate(arrays, cfg, {"ok": ok, "empty": []}, progress=False)
    toks = _tokens(rng, cfg, 2, 4)
    with pytest.raises(DataError, match=r"domain 'masked' produced no calibration tokens"):
        calibrate(arrays, cfg, {"masked": [(toks, np.zeros_like(toks, bool))]}, progress=False)
    with pytest.raises(DataError, match="batches_by_domain is empty"):
        calibrate(arrays, cfg, {}, progress=False)


def test_bad_batches_and_params(model):
    cfg, arrays = model
    rng = np.random.default_rng(9)
    bad = _tokens(rng, cfg, 1, 4)
    bad[0, 2] = cfg.vocab_size
    with pytest.raises(DataError, match=r"domain 'd', batch 1: token ids must lie in \[0, 97\)"):
        calibrate(arrays, cfg, {"d": [_tokens(rng, cfg, 1, 4), bad]}, progress=False)
    with pytest.raises(DataError, match=r"batch 0: expected integer tokens \[B, T\]"):
        calibrate(arrays, cfg, {"d": [np.zeros(4, np.int32)]}, progress=False)
    toks = _tokens(rng, cfg, 2, 4)
    with pytest.raises(DataError, match=r"mask shape \(2, 3\) differs from tokens shape \(2, 4\)"):
        calibrate(arrays, cfg, {"d": [(toks, np.ones((2, 3)))]}, progress=False)
    wrong = tiny_model_config(ffn_dim=40)
    with pytest.raises(ShapeError, match=r"'layers.wg' has shape \(2, 32, 48\).*expects \(2, 32, 40\)"):
        calibrate(arrays, wrong, {"d": [toks]}, progress=False)


def test_stats_dataclass_mean():
    s = CalibrationStats(("a", "b"), np.arange(12, dtype=np.float64).reshape(2, 2, 3), np.array([2, 4]), {})
    np.testing.assert_allclose(s.mean()[1], np.arange(6, 12).reshape(2, 3) / 4)
    np.testing.assert_allclose(s.pooled_mean(), (np.arange(6).reshape(2, 3) + np.arange(6, 12).reshape(2, 3)) / 6)


def test_partial_from_other_inputs_is_recomputed(model, tmp_path):
    """A saved domain is reused only for the same calibration inputs (settings that made the batches)."""
    cfg, arrays = model
    rng = np.random.default_rng(8)
    short = {"a": [_tokens(rng, cfg, 1, 4)]}
    longer = {"a": [_tokens(rng, cfg, 2, 8)]}
    first = calibrate(arrays, cfg, short, model_id="m", partial_dir=tmp_path, progress=False,
                      inputs={"calib_seq_len": 4})
    again = calibrate(arrays, cfg, longer, model_id="m", partial_dir=tmp_path, progress=False,
                      inputs={"calib_seq_len": 4})  # same inputs claimed: the partial is reused
    np.testing.assert_array_equal(again.sums_NLF, first.sums_NLF)
    fresh = calibrate(arrays, cfg, longer, model_id="m", progress=False)
    changed = calibrate(arrays, cfg, longer, model_id="m", partial_dir=tmp_path, progress=False,
                        inputs={"calib_seq_len": 8})
    np.testing.assert_array_equal(changed.tokens_N, fresh.tokens_N)
    np.testing.assert_allclose(changed.sums_NLF, fresh.sums_NLF, rtol=1e-12)
    assert not np.array_equal(changed.tokens_N, first.tokens_N)
