"""Dense Llama: the decoder against a float64 numpy reference, and KV-cache decode == full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.config import tiny_model_config
from readme_jax.errors import CheckpointError
from readme_jax.model import decoder
from readme_jax.model.llama import Llama, make_apply


def np_forward(p, cfg, tok):
    """Float64 numpy Llama (rotate-half RoPE, GQA, SwiGLU) written independently of layers.py."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    B, T = tok.shape
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def norm(x, w):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * w

    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # [B,T,N,hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        c, s = cos[None, :, None], sin[None, :, None]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    x = p["embed"][tok]
    for l in range(cfg.n_layers):
        lp = {k: v[l] for k, v in p["layers"].items()}
        h = norm(x, lp["attn_norm"])
        q = rope((h @ lp["wq"]).reshape(B, T, H, hd))
        k = rope((h @ lp["wk"]).reshape(B, T, K, hd))
        v = (h @ lp["wv"]).reshape(B, T, K, hd)
        k = np.repeat(k, H // K, axis=2)
        v = np.repeat(v, H // K, axis=2)
        s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", a, v).reshape(B, T, H * hd)
        x = x + o @ lp["wo"]
        h = norm(x, lp["ffn_norm"])
        g = h @ lp["wg"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ lp["wu"])) @ lp["wd"]
    x = norm(x, p["final_norm"])
    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


@pytest.mark.parametrize("tied,kv", [(False, 2), (True, 4), (False, 1)])
def test_forward_matches_numpy(tied, kv):
    cfg = tiny_model_config(tie_embeddings=tied, n_kv_heads=kv)
    seed = np.random.SeedSequence().entropy % 2**31
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    tok = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11))
    ours, _ = model(jnp.asarray(tok))
    ref = np_forward(model.arrays(), cfg, tok)
    rel = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, rel


def test_prefill_then_decode_equals_full_forward():
    cfg = tiny_model_config()
    model = Llama(cfg, rngs=nnx.Rngs(3))
    state, apply = make_apply(model)
    tok = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (3, 12), 0, cfg.vocab_size)
    full, _ = apply(state, tok)
    cache = decoder.init_cache(cfg, 3, 16)
    pos = jnp.broadcast_to(jnp.arange(5), (3, 5))
    outs = []
    logit, cache = apply(state, tok[:, :5], pos, cache)
    outs.append(logit)
    for t in range(5, 12):
        logit, cache = apply(state, tok[:, t:t + 1], jnp.full((3, 1), t), cache)
        outs.append(logit)
    inc = jnp.concatenate(outs, axis=1)
    rel = float(jnp.abs(inc - full).max() / jnp.abs(full).max())
    assert rel < 1e-5, rel


def test_slots_at_different_positions():
    """Rows of one decode batch may sit at different positions (serving slots)."""
    cfg = tiny_model_config()
    model = Llama(cfg, rngs=nnx.Rngs(4))
    tok = jax.random.randint(jax.random.key(5), (2, 9), 0, cfg.vocab_size)
    full, _ = model(tok)
    cache = decoder.init_cache(cfg, 2, 16)
    # row 0 prefilled with 4 tokens, row 1 with 7 (row 0's extra prefill positions are padding)
    pos = jnp.stack([jnp.array([0, 1, 2, 3, 99, 99, 99]), jnp.arange(7)])
    _, cache = model(tok[:, :7], pos, cache)
    step_pos = jnp.array([[4], [7]])
    step_tok = jnp.stack([tok[0, 4:5], tok[1, 7:8]])
    logit, cache = model(step_tok, step_pos, cache)
    np.testing.assert_allclose(logit[0, 0], full[0, 4], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logit[1, 0], full[1, 7], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_close_to_float32():
    cfg = tiny_model_config()
    model = Llama(cfg, rngs=nnx.Rngs(6))
    tok = jax.random.randint(jax.random.key(7), (2, 8), 0, cfg.vocab_size)
    f32, _, _ = decoder.forward(model.arrays(), cfg, tok)
    cfg16 = tiny_model_config(dtype="bfloat16")
    b16, _, _ = decoder.forward(model.arrays(), cfg16, tok)
    assert b16.dtype == jnp.float32
    assert float(jnp.abs(b16 - f32).max() / jnp.abs(f32).max()) < 5e-2


def test_from_arrays_errors_name_tensor_and_shapes():
    cfg = tiny_model_config()
    arrays = Llama(cfg, rngs=nnx.Rngs(0)).arrays()
    bad = jax.tree.map(lambda a: a, arrays)
    bad["layers"]["wq"] = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(CheckpointError, match=r"'layers.wq' has shape \(2, 3, 4\), expected \(2, 32, 32\)"):
        Llama.from_arrays(cfg, bad, source="x.gguf")
    del bad["layers"]["wq"]
    with pytest.raises(CheckpointError, match=r"x.gguf: missing tensor 'layers.wq'"):
        Llama.from_arrays(cfg, bad, source="x.gguf")
