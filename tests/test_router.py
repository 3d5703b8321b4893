"""The pre-gating router: causal (route of t depends on tokens <= t), incremental == full."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.errors import ConfigError
from readme_jax.model import decoder
from readme_jax.model.router import RouterConfig, make_router, route_ids, router_model_config

V = 61


def _router(**kw):
    rc = RouterConfig(width=16, n_heads=2, ffn_dim=24, embed_init="random",
                      seed=int(np.random.randint(1 << 30)), **kw)
    return rc, make_router(rc, n_experts=5, vocab_size=V, max_seq_len=32)


@pytest.mark.parametrize("kw", [{}, {"mlp": "silu_bias", "score_scale": "none"}])
def test_incremental_routing_equals_full(kw):
    rc, router = _router(**kw)
    tok = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 10), 0, V)
    full, _ = router(tok)
    assert full.shape == (2, 10, 5)
    cache = decoder.init_cache(router.cfg, 2, 16)
    out, cache = router(tok[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)), cache)
    outs = [out]
    for t in range(4, 10):
        out, cache = router(tok[:, t:t + 1], jnp.full((2, 1), t), cache)
        outs.append(out)
    inc = jnp.concatenate(outs, 1)
    np.testing.assert_allclose(inc, full, rtol=1e-5, atol=1e-5)
    assert (route_ids(inc) == route_ids(full)).all()


def test_route_is_causal():
    _, router = _router()
    tok = jax.random.randint(jax.random.key(1), (1, 8), 0, V)
    other = tok.at[0, 5:].set((tok[0, 5:] + 1) % V)
    a, _ = router(tok)
    b, _ = router(other)
    np.testing.assert_allclose(a[0, :5], b[0, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 5:], b[0, 5:])


def test_variants_change_the_function():
    rc = RouterConfig(width=16, n_heads=2, ffn_dim=24, embed_init="random", seed=3)
    r1 = make_router(rc, 5, V, 32)
    r2 = make_router(RouterConfig(**{**rc.__dict__, "score_scale": "none"}), 5, V, 32)
    tok = jax.random.randint(jax.random.key(2), (1, 8), 0, V)
    assert not np.allclose(r1(tok)[0], r2(tok)[0])
    assert router_model_config(rc, V, 32).attn_scale is None
    assert "bias1" in make_router(RouterConfig(**{**rc.__dict__, "mlp": "silu_bias"}), 5, V, 32).arrays()["layers"]


def test_embedding_from_backbone():
    emb = np.random.default_rng(0).standard_normal((V, 24)).astype(np.float32)
    r = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=8), 3, V, 32, backbone_embed_VD=emb)
    np.testing.assert_array_equal(np.asarray(r.embed[...]), emb[:, :16])
    wide = make_router(RouterConfig(width=32, n_heads=2, ffn_dim=8), 3, V, 32, backbone_embed_VD=emb)
    e = np.asarray(wide.embed[...])
    assert e.shape == (V, 32)
    # an orthonormal projection keeps inner products between token embeddings
    np.testing.assert_allclose(e @ e.T, emb @ emb.T, rtol=1e-4, atol=1e-3)


def test_paper_size_router_params():
    rc = RouterConfig()  # paper: 1 layer, 4 heads, width 512; ~18M params with Llama-2's 32000 vocab
    shapes = jax.eval_shape(lambda: make_router(
        RouterConfig(**{**rc.__dict__, "embed_init": "random"}), 7, 32000, 4096).arrays())
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert 17e6 < n < 20e6, n


def test_bad_router_config():
    with pytest.raises(ConfigError, match="router.mlp"):
        RouterConfig(mlp="gelu")
    with pytest.raises(ConfigError, match="even heads"):
        RouterConfig(width=10, n_heads=4)
    with pytest.raises(ConfigError, match="needs the backbone's embedding"):
        make_router(RouterConfig(width=16, n_heads=2), 3, V, 32)
