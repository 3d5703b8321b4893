"""Routed (Read-ME) per-block NLL against float64 numpy on the backbone's own logits; route accuracy."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.config import tiny_model_config
from readme_jax.eval.routing import (fixed_route_block_nll, fixed_route_nll, readme_domain_block_nll,
                                     readme_domain_nll, route_accuracy, routes_for)
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import RouterConfig, make_router

E = 3


def _numpy_block_nll(backbone, tok_NT1, route_NT):
    logits, _ = backbone(jnp.asarray(tok_NT1[:, :-1]), route_BT=jnp.asarray(route_NT))
    z = np.asarray(logits, np.float64)
    m = z.max(-1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tok_NT1[:, 1:, None], -1)[..., 0].mean(-1)


def _setup():
    seed = int(np.random.randint(1 << 30))
    cfg = tiny_model_config()
    backbone = MoEBackbone(cfg, rngs=nnx.Rngs(seed), n_experts=E, expert_dim=16)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16), E, cfg.vocab_size, 32,
                         backbone_embed_VD=backbone.embed[...])
    blocks = {d: np.random.randint(0, cfg.vocab_size, (n, 9)).astype(np.int32) for d, n in (("a", 3), ("b", 2))}
    return cfg, backbone, router, blocks


def test_readme_block_nll_matches_numpy_with_the_routers_routes():
    cfg, backbone, router, blocks = _setup()
    model = ReadMEModel.from_modules(router, backbone)
    got = readme_domain_block_nll(model, "xla", blocks, batch_size=2)
    mean = readme_domain_nll(model, "xla", blocks, batch_size=2)
    for d, b in blocks.items():
        route = routes_for(model, b)
        np.testing.assert_array_equal(route, np.argmax(np.asarray(router(jnp.asarray(b[:, :-1]))[0]), -1))
        ref = _numpy_block_nll(backbone, b, route)
        assert got[d].shape == (len(b),) and got[d].dtype == np.float64
        np.testing.assert_allclose(got[d], ref, rtol=1e-5)
        assert abs(got[d].mean() - mean[d]) < 1e-9


def test_fixed_route_block_nll_matches_numpy_and_mean():
    cfg, backbone, _, blocks = _setup()
    b = blocks["a"]
    got = fixed_route_block_nll(backbone.arrays(), cfg, "xla", b, 2, batch_size=2)
    np.testing.assert_allclose(got, _numpy_block_nll(backbone, b, np.full((len(b), 8), 2)), rtol=1e-5)
    assert abs(got.mean() - fixed_route_nll(backbone.arrays(), cfg, "xla", b, 2, batch_size=2)) < 1e-9


def test_route_accuracy_counts_tokens_on_the_own_expert():
    r = np.array([[0, 0, 1, 2], [0, 1, 1, 1]])
    assert route_accuracy(r, 0) == 3 / 8 and route_accuracy(r, 1) == 4 / 8 and route_accuracy(r, 2) == 1 / 8
