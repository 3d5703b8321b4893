"""`train.remat: layer` (jax.checkpoint around the scanned decoder layer): same loss and gradients,
and the switch reaches the training step and the Trainer."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from readme_jax.config import StageConfig, TrainConfig, tiny_model_config
from readme_jax.errors import ConfigError
from readme_jax.model import decoder
from readme_jax.model.moe import MoEBackbone, routed_ffn
from readme_jax.train import loop, steps
from readme_jax.workflow.stages import NO_RESULT_KEYS, stage_keys

E, FE = 3, 24


def _problem(seed: int):
    cfg = tiny_model_config(n_layers=3, ffn_dim=48)
    params = MoEBackbone(cfg, rngs=nnx.Rngs(seed), n_experts=E, expert_dim=FE).arrays()
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    tokens = jax.random.randint(k1, (2, 9), 0, cfg.vocab_size)
    route = jax.random.randint(k2, (2, 8), 0, E)
    return cfg, params, tokens, route


def _loss(cfg, remat):
    ffn = routed_ffn("reference")

    def loss(params, tokens, route):
        logits, _, _ = decoder.forward(params, cfg, tokens[:, :-1], ffn=ffn, ffn_ctx=route, remat=remat)
        return decoder.token_nll(logits, tokens[:, 1:]).mean()

    return loss


def test_remat_gives_the_same_loss_and_gradients():
    """Equal up to float32 rounding (XLA fuses the recomputed layer differently: not bitwise; measured
    ~1e-6 relative), which is why train.remat stays out of the stage fingerprints like a device change."""
    cfg, params, tokens, route = _problem(int(np.random.randint(1000)))
    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(_loss(cfg, r)))(params, tokens, route) for r in (False, True))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves_with_path(g1)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _has_remat(jaxpr) -> bool:
    return "remat" in str(jaxpr) or "checkpoint" in str(jaxpr)


def test_remat_reaches_the_lm_step():
    cfg, params, tokens, route = _problem(0)
    trainable, frozen = steps.split_params(params, steps.FROZEN_TOP_KEYS_NO_EMBED)
    tx = optax.adamw(1.0)
    opt = tx.init(trainable)
    found = {}
    for remat in (False, True):
        step = steps.make_lm_step(cfg, routed_ffn("reference"), lambda p, x: route, tx, remat=remat)
        found[remat] = _has_remat(jax.make_jaxpr(step)(trainable, frozen, opt, {}, tokens, 1e-3))
    assert found == {False: False, True: True}


def test_remat_config_choice_and_fingerprint():
    assert TrainConfig().remat == "none"
    assert TrainConfig(remat="layer").remat == "layer"
    with pytest.raises(ConfigError, match="train.remat"):
        TrainConfig(remat="everything")
    # the same function and gradients: a finished train stage stays valid when only remat changes
    assert "train.remat" in NO_RESULT_KEYS and "train" in stage_keys("train")


def test_trainer_builds_its_expert_step_with_remat(tmp_path, monkeypatch):
    seen = []
    real = steps.make_lm_step

    def spy(*a, **kw):
        seen.append(kw.get("remat"))
        return real(*a, **kw)

    monkeypatch.setattr(loop.steps, "make_lm_step", spy)
    tc = TrainConfig(rounds=1, remat="layer", router=StageConfig(steps=1, batch_size=2, lr=1e-3, seq_len=8),
                     experts=StageConfig(steps=1, batch_size=2, lr=1e-3, seq_len=8))
    t = loop.Trainer.__new__(loop.Trainer)  # only the step builder is exercised: no data, no checkpoints
    t.train_cfg, t.mesh_cfg, t.impl, t._expert_step, t._expert_tx = tc, None, "reference", None, optax.adamw(1.0)

    class M:
        backbone_cfg = tiny_model_config()
        router_cfg, router_mlp = None, "swiglu"

    t._expert_step_fn(M())
    assert seen == [True]
