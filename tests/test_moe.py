"""MoE backbone: r=1 equals dense, masked-dense equivalence, KV-cache decode, layer-wise baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from readme_jax.config import tiny_model_config
from readme_jax.errors import ConfigError
from readme_jax.model import decoder
from readme_jax.model.llama import Llama
from readme_jax.model.moe import LayerwiseMoE, MoEBackbone, routed_ffn
from readme_jax.model.readme_model import ExpertLayout, ReadMEModel
from readme_jax.model.router import RouterConfig, make_router

E = 3


def _seed():
    return int(np.random.randint(1 << 30))


def _dense(cfg):
    return Llama(cfg, rngs=nnx.Rngs(_seed()))


def _experts_from_channels(dense_arrays, chan_LEF):
    """Gather expert weights [L,E,D,Fe]/[L,E,Fe,D] from dense channels (independent of convert/)."""
    lay = dense_arrays["layers"]
    wg = np.stack([[np.asarray(lay["wg"][l])[:, c] for c in chan_LEF[l]] for l in range(len(chan_LEF))])
    wu = np.stack([[np.asarray(lay["wu"][l])[:, c] for c in chan_LEF[l]] for l in range(len(chan_LEF))])
    wd = np.stack([[np.asarray(lay["wd"][l])[c, :] for c in chan_LEF[l]] for l in range(len(chan_LEF))])
    out = jax.tree.map(np.asarray, dense_arrays)
    out["layers"].update(wg=wg, wu=wu, wd=wd)
    return out


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_full_width_experts_equal_dense_for_any_route(impl):
    cfg = tiny_model_config()
    dense = _dense(cfg)
    F = cfg.ffn_dim
    chan = np.stack([np.stack([np.random.permutation(F) for _ in range(E)]) for _ in range(cfg.n_layers)])
    moe = MoEBackbone.from_arrays(cfg, _experts_from_channels(dense.arrays(), chan),
                                  n_experts=E, expert_dim=F, impl=impl)
    tok = jax.random.randint(jax.random.key(_seed()), (2, 9), 0, cfg.vocab_size)
    route = jax.random.randint(jax.random.key(_seed()), (2, 9), 0, E)
    ref, _ = dense(tok)
    out, _ = moe(tok, route_BT=route)
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 1e-5


def _masked_dense_ffn(mask_LEF):
    def ffn(lp, h, route_BT):
        l = lp["layer_index"]
        m = mask_LEF[l][route_BT]  # [B,T,F]
        g = h @ lp["wg"]
        hid = jax.nn.silu(g) * (h @ lp["wu"]) * m
        return hid @ lp["wd"], None
    return ffn


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_moe_equals_masked_dense(impl):
    cfg = tiny_model_config()
    dense = _dense(cfg)
    F, Fe = cfg.ffn_dim, 20
    chan = np.sort(np.stack([np.stack([np.random.permutation(F)[:Fe] for _ in range(E)])
                             for _ in range(cfg.n_layers)]), axis=-1)
    mask = np.zeros((cfg.n_layers, E, F), np.float32)
    for l in range(cfg.n_layers):
        for e in range(E):
            mask[l, e, chan[l, e]] = 1
    moe = MoEBackbone.from_arrays(cfg, _experts_from_channels(dense.arrays(), chan),
                                  n_experts=E, expert_dim=Fe, impl=impl)
    tok = jax.random.randint(jax.random.key(_seed()), (2, 9), 0, cfg.vocab_size)
    route = jax.random.randint(jax.random.key(_seed()), (2, 9), 0, E)
    p = dense.arrays()
    p["layers"]["layer_index"] = jnp.arange(cfg.n_layers)
    ref, _, _ = decoder.forward(p, cfg, tok, ffn=_masked_dense_ffn(jnp.asarray(mask)), ffn_ctx=route)
    out, _ = moe(tok, route_BT=route)
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 1e-5


def test_moe_kv_cache_decode_equals_full():
    cfg = tiny_model_config()
    moe = MoEBackbone(cfg, rngs=nnx.Rngs(_seed()), n_experts=E, expert_dim=16)
    tok = jax.random.randint(jax.random.key(_seed()), (2, 8), 0, cfg.vocab_size)
    route = jax.random.randint(jax.random.key(_seed()), (2, 8), 0, E)
    full, _ = moe(tok, route_BT=route)
    cache = decoder.init_cache(cfg, 2, 12)
    out, cache = moe(tok[:, :3], jnp.broadcast_to(jnp.arange(3), (2, 3)), cache, route_BT=route[:, :3])
    outs = [out]
    for t in range(3, 8):
        out, cache = moe(tok[:, t:t + 1], jnp.full((2, 1), t), cache, route_BT=route[:, t:t + 1])
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_layerwise_baseline_matches_per_token_reference():
    cfg = tiny_model_config(n_layers=1)
    moe = LayerwiseMoE(cfg, rngs=nnx.Rngs(_seed()), n_experts=E, expert_dim=16)
    tok = jax.random.randint(jax.random.key(_seed()), (1, 6), 0, cfg.vocab_size)
    p = moe.arrays()
    lay = {k: np.asarray(v[0], np.float64) for k, v in p["layers"].items()}

    def np_ffn(h):  # per-token loop in float64: argmax gate, softmax-prob scaling
        rows = []
        for x in np.asarray(h, np.float64).reshape(-1, cfg.d_model):
            lg = x @ lay["gate"]
            e = int(np.argmax(lg))
            pr = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
            g = x @ lay["wg"][e]
            rows.append(pr[e] * ((g / (1 + np.exp(-g))) * (x @ lay["wu"][e])) @ lay["wd"][e])
        return np.stack(rows).reshape(h.shape).astype(np.float32)

    def ffn(lp, h, ctx):
        return jax.pure_callback(np_ffn, jax.ShapeDtypeStruct(h.shape, jnp.float32), h), None

    ref, _, _ = decoder.forward(p, cfg, tok, ffn=ffn)
    out, _ = moe(tok)
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 1e-5


def test_readme_composite_routes_before_backbone():
    cfg = tiny_model_config()
    backbone = MoEBackbone(cfg, rngs=nnx.Rngs(_seed()), n_experts=E, expert_dim=16)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16), E, cfg.vocab_size, 32,
                         backbone_embed_VD=backbone.embed[...])
    model = ReadMEModel.from_modules(router, backbone)
    assert model.layout == ExpertLayout(E, 16) and model.layout.kind == "fixed"
    tok = jax.random.randint(jax.random.key(_seed()), (2, 7), 0, cfg.vocab_size)
    out = model(tok)
    assert out.route.shape == (2, 7) and out.route.dtype == jnp.int32
    assert int(out.route.min()) >= 0 and int(out.route.max()) < E
    direct, _ = backbone(tok, route_BT=out.route)
    np.testing.assert_allclose(out.logits, direct, rtol=1e-6, atol=1e-6)
    forced = model(tok, route_BT=jnp.zeros_like(out.route))
    assert (forced.route == 0).all()
    # a pytree: through jit as an argument, configs static, params leaves
    jitted = jax.jit(lambda m, t: m(t).logits)(model, tok)
    np.testing.assert_allclose(jitted, out.logits, rtol=1e-5, atol=1e-6)
    leaves = jax.tree.leaves(model)
    assert len(leaves) == len(jax.tree.leaves(router.arrays())) + len(jax.tree.leaves(backbone.arrays()))
    doubled = jax.tree.map(lambda x: x * 2, model)
    assert isinstance(doubled, ReadMEModel) and doubled.layout == model.layout


def test_readme_model_validate_names_the_mismatch():
    cfg = tiny_model_config()
    backbone = MoEBackbone(cfg, rngs=nnx.Rngs(0), n_experts=E, expert_dim=16)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16), E + 1, cfg.vocab_size, 32,
                         backbone_embed_VD=backbone.embed[...])
    with pytest.raises(ConfigError, match="router has 4 experts, backbone 3"):
        ReadMEModel.from_modules(router, backbone)
    ok = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16), E, cfg.vocab_size, 32,
                     backbone_embed_VD=backbone.embed[...])
    model = ReadMEModel.from_modules(ok, backbone)
    with pytest.raises(ConfigError, match="router head must be"):
        model.replace(router_params={**model.router_params, "head": model.router_params["head"][:, :2]}).validate()
    with pytest.raises(ConfigError, match="shared_dim=4"):
        model.replace(layout=ExpertLayout(E, 16, 4)).validate()


def test_moe_needs_route():
    cfg = tiny_model_config()
    moe = MoEBackbone(cfg, rngs=nnx.Rngs(0), n_experts=E, expert_dim=16)
    with pytest.raises(ConfigError, match="needs route_BT"):
        moe(jnp.zeros((1, 3), jnp.int32))


def test_split_layout_ffns_agree_with_a_per_token_float64_loop():
    """routed_ffn adds the shared part for every token (the serving engine's FFN: test_serve_experts_ffn.py)."""
    rng = np.random.default_rng(_seed())
    E, D, R, P, T = 3, 16, 8, 5, 13
    lp = {"wg": rng.standard_normal((E, D, R)), "wu": rng.standard_normal((E, D, R)), "wd": rng.standard_normal((E, R, D)),
          "shared_wg": rng.standard_normal((D, P)), "shared_wu": rng.standard_normal((D, P)),
          "shared_wd": rng.standard_normal((P, D))}
    lp = {k: (v * 0.3).astype(np.float32) for k, v in lp.items()}
    h = rng.standard_normal((1, T, D)).astype(np.float32)
    route = rng.integers(0, E, (1, T)).astype(np.int32)

    def swiglu64(x, wg, wu, wd):
        g, u = x @ wg.astype(np.float64), x @ wu.astype(np.float64)
        return (g / (1 + np.exp(-g)) * u) @ wd.astype(np.float64)

    x = h[0].astype(np.float64)
    want = np.stack([swiglu64(x[t], lp["wg"][route[0, t]], lp["wu"][route[0, t]], lp["wd"][route[0, t]])
                     + swiglu64(x[t], lp["shared_wg"], lp["shared_wu"], lp["shared_wd"]) for t in range(T)])
    jlp = {k: jnp.asarray(v) for k, v in lp.items()}
    for impl in ("reference", "xla"):
        got, _ = routed_ffn(impl)(jlp, jnp.asarray(h), jnp.asarray(route))
        np.testing.assert_allclose(np.asarray(got[0], np.float64), want, rtol=1e-4, atol=1e-4)
