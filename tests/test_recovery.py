"""Expert tuning's recovery loss (train/recovery.py): KL to the dense teacher against float64 numpy, the
loss kinds, and the LM step learning from a teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from readme_jax.config import TrainConfig, tiny_model_config
from readme_jax.errors import ConfigError
from readme_jax.model import decoder
from readme_jax.model.llama import Llama
from readme_jax.train import recovery, steps


def _np_kl(s, t, temp):
    s, t = np.asarray(s, np.float64) / temp, np.asarray(t, np.float64) / temp
    ls = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
    lt = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
    return (np.exp(lt) * (lt - ls)).sum(-1) * temp * temp


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kl_to_teacher_matches_float64_numpy(temp):
    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    s, t = rng.normal(size=(2, 5, 37)) * 3, rng.normal(size=(2, 5, 37)) * 3
    got = recovery.kl_to_teacher(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temp)
    np.testing.assert_allclose(np.asarray(got), _np_kl(s, t, temp), rtol=1e-4, atol=1e-5)
    assert (np.asarray(got) >= -1e-6).all()
    np.testing.assert_allclose(np.asarray(recovery.kl_to_teacher(jnp.asarray(t), jnp.asarray(t), temp)), 0.0,
                               atol=1e-5)


def test_loss_kinds_combine_lm_and_kl():
    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    s, t = jnp.asarray(rng.normal(size=(2, 4, 11)), jnp.float32), jnp.asarray(rng.normal(size=(2, 4, 11)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 11, (2, 4)), jnp.int32)
    lm = float(decoder.token_nll(s, y).mean())
    kl = float(_np_kl(s, t, 1.0).mean())
    assert float(recovery.recovery_loss(s, y, None, "lm", 0.5, 1.0)[0]) == pytest.approx(lm, rel=1e-5)
    assert float(recovery.recovery_loss(s, y, t, "kl", 0.5, 1.0)[0]) == pytest.approx(kl, rel=1e-4)
    got, parts = recovery.recovery_loss(s, y, t, "kl+lm", 0.3, 1.0)
    assert float(got) == pytest.approx(0.3 * lm + 0.7 * kl, rel=1e-4)
    assert set(parts) == {"lm", "kl"}
    with pytest.raises(ValueError, match="unknown expert loss"):
        recovery.recovery_loss(s, y, t, "mse", 0.5, 1.0)


def test_bad_recovery_config():
    with pytest.raises(ConfigError, match="expert_loss"):
        TrainConfig(expert_loss="mse")
    with pytest.raises(ConfigError, match="lm_weight"):
        TrainConfig(lm_weight=1.5)
    with pytest.raises(ConfigError, match="kd_temperature"):
        TrainConfig(kd_temperature=0.0)


def _tiny(seed):
    cfg = tiny_model_config(n_layers=2, ffn_dim=32)
    return cfg, Llama(cfg, rngs=nnx.Rngs(seed)).arrays()


def test_kl_step_moves_the_student_towards_the_teacher():
    """A student that differs from its teacher: steps on the KL lower the KL on the batch; a student equal
    to its teacher has KL 0 and a zero gradient."""
    cfg, teacher = _tiny(1)
    _, student = _tiny(2)
    blocks = jax.random.randint(jax.random.key(int(np.random.randint(1 << 30))), (2, 9), 0, cfg.vocab_size)
    spec = steps.LossSpec(kind="kl", teacher_cfg=cfg)
    tx = optax.adam(1.0)
    step = steps.make_lm_step(cfg, decoder.dense_ffn, None, tx, loss=spec)
    tr, fr = steps.split_params(student, steps.frozen_keys(False))
    opt = tx.init(tr)
    first = None
    for _ in range(5):
        tr, opt, m = step(tr, fr, opt, None, blocks, 3e-3, teacher)
        first = float(m["kl"]) if first is None else first
        assert float(m["loss"]) == pytest.approx(float(m["kl"]))
    _, _, m = step(tr, fr, opt, None, blocks, 0.0, teacher)
    assert float(m["kl"]) < 0.9 * first
    ttr, tfr = steps.split_params(teacher, steps.frozen_keys(False))
    _, _, m = step(ttr, tfr, tx.init(ttr), None, blocks, 0.0, teacher)
    assert abs(float(m["kl"])) < 1e-5 and float(m["grad_norm"]) < 1e-4


def test_teacher_loss_needs_a_teacher_config():
    cfg, _ = _tiny(0)
    with pytest.raises(ValueError, match="teacher"):
        steps.make_lm_step(cfg, decoder.dense_ffn, None, optax.adam(1.0), loss=steps.LossSpec(kind="kl"))


def test_readme_and_pruned_twin_tune_on_the_same_batches_with_the_same_loss(tmp_path, cache_dir, monkeypatch):
    """The comparison is fair: the pruned twin's tuning sees exactly the experts' batches, in order, with the
    same loss (and the same dense teacher)."""
    from conftest import tiny_run_config
    from readme_jax.workflow import run as run_mod

    specs, seen = [], []
    real_make, real_acc = steps.make_lm_step, steps.accumulated_step

    def make(*a, **kw):
        specs.append(kw.get("loss"))
        return real_make(*a, **kw)

    def acc(step_fn, trainable, frozen, opt_state, ctx, batch, grad_accum, lr, teacher=None):
        seen.append((np.asarray(batch).tobytes(), teacher is not None))
        return real_acc(step_fn, trainable, frozen, opt_state, ctx, batch, grad_accum, lr, teacher)

    monkeypatch.setattr(steps, "make_lm_step", make)
    monkeypatch.setattr(steps, "accumulated_step", acc)
    cfg = tiny_run_config(tmp_path / "run", cache_dir, "data.chat_prompts=0", "train.expert_loss=kl",
                          "train.rounds=1", "stages=[refactor,train,baseline]")
    run_mod.run(cfg, progress=False, log=lambda m: None)
    assert len(specs) == 2 and specs[0] == specs[1] and specs[0].kind == "kl"
    half = len(seen) // 2
    assert half == cfg.train.rounds * cfg.train.experts.steps
    assert seen[:half] == seen[half:]  # experts first (train), then the twin (baseline): the same batches
    assert all(t for _, t in seen)  # both learn from the dense teacher
