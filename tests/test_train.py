"""Read-ME training: distillation target vs float64 numpy, schedules, steps, freezing, resume."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from readme_jax.config import StageConfig, TrainConfig, load, tiny_model_config
from readme_jax.errors import ConfigError, TrainingError
from readme_jax.model import decoder
from readme_jax.model.moe import MoEBackbone, routed_ffn
from readme_jax.model.router import RouterConfig, make_router
from readme_jax.train import distill, schedule, steps
from readme_jax.eval.routing import routes_for
from readme_jax.model.readme_model import ExpertLayout, ReadMEModel
from readme_jax.train.loop import Trainer, stage_summaries

E, F, FE = 3, 48, 24


def expected_lr(stage: StageConfig, round_idx: int, decay: float, step: int) -> float:
    """The schedule's formula written out: the reference the optax schedule is checked against."""
    peak = schedule.round_peak_lr(stage.lr, round_idx, decay)
    n = max(stage.steps, 1)
    w = stage.warmup_steps
    if w and step < w:
        return peak * step / w
    frac = min(max(step - w, 0) / max(n - w, 1), 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * frac))


def _seed():
    return int(np.random.randint(1 << 30))


def _channel_index(L, rng):
    return np.sort(np.stack([np.stack([rng.permutation(F)[:FE] for _ in range(E)]) for _ in range(L)]), -1)


def _setup(seed=0, L=2):
    cfg = tiny_model_config(n_layers=L, ffn_dim=F)
    rng = np.random.default_rng(seed)
    backbone = MoEBackbone(cfg, rngs=nnx.Rngs(seed), n_experts=E, expert_dim=FE)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16, seed=seed), E, cfg.vocab_size, 64,
                         backbone_embed_VD=backbone.embed[...])
    return cfg, backbone, router, _channel_index(L, rng)


def test_teacher_overlap_matches_float64_numpy():
    cfg, backbone, _, ci = _setup(_seed() % 1000)
    p = backbone.arrays()
    tok = jax.random.randint(jax.random.key(_seed()), (2, 7), 0, cfg.vocab_size)
    route = jax.random.randint(jax.random.key(_seed()), (2, 7), 0, E)
    masks = distill.expert_masks_from_index(ci, F)
    got = distill.teacher_overlap(p, jnp.asarray(ci), masks, tok, route, cfg=cfg, ffn_dim=F)

    def capture(lp, h, r):  # the stream's FFN input per layer, to feed the numpy reference
        y, _ = routed_ffn("xla")(lp, h, r)
        return y, h

    _, _, h_LBTD = decoder.forward(p, cfg, tok, ffn=capture, ffn_ctx=route, logits=False)
    h = np.asarray(h_LBTD, np.float64)
    ref = np.zeros((2, 7, E))
    for l in range(cfg.n_layers):
        wg, wu = (np.asarray(p["layers"][k][l], np.float64) for k in ("wg", "wu"))
        for b in range(2):
            for t in range(7):
                tot, cnt = np.zeros(F), np.zeros(F)
                for e in range(E):
                    g = h[l, b, t] @ wg[e]
                    a = np.abs(g / (1 + np.exp(-g)) * (h[l, b, t] @ wu[e]))
                    tot[ci[l, e]] += a
                    cnt[ci[l, e]] += 1
                mag = tot / np.maximum(cnt, 1)
                top = set(np.argsort(-mag)[:FE])
                for e in range(E):
                    ref[b, t, e] += len(top & set(ci[l, e])) / FE / cfg.n_layers
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)


def test_router_losses():
    logits = jax.random.normal(jax.random.key(_seed()), (2, 5, E))
    target = jax.nn.softmax(jax.random.normal(jax.random.key(_seed()), (2, 5, E)))
    t, lp = np.asarray(target, np.float64), np.asarray(jax.nn.log_softmax(logits), np.float64)
    kl = (t * (np.log(t) - lp)).sum(-1).mean()
    assert abs(float(distill.router_loss(logits, target, "kl")) - kl) < 1e-5
    hard = np.eye(E)[t.argmax(-1)] * 0.5 + 0.5 / E
    ref = (0.75 * -(hard * lp).sum(-1) + 0.25 * -(t * lp).sum(-1)).mean()
    assert abs(float(distill.router_loss(logits, target, "reference")) - ref) < 1e-5


def test_schedule_values_at_round_boundaries():
    st = StageConfig(steps=10, batch_size=2, lr=1e-3, warmup_steps=2)
    for r in range(3):
        sched = schedule.stage_schedule(st, r, 0.8)
        for step in (0, 1, 2, 5, 9, 10):
            assert abs(float(sched(step)) - expected_lr(st, r, 0.8, step)) < 1e-9
        assert abs(expected_lr(st, r, 0.8, 2) - 1e-3 * 0.8**r) < 1e-12  # peak after warmup
    assert float(schedule.stage_schedule(dataclasses.replace(st, warmup_steps=0), 1, 0.8)(0)) == pytest.approx(8e-4)


def test_one_router_step_and_one_expert_step_decrease_loss():
    cfg, backbone, router, ci = _setup(1)
    tok = jax.random.randint(jax.random.key(2), (4, 12), 0, cfg.vocab_size)
    target = jax.nn.softmax(jax.random.normal(jax.random.key(3), (4, 11, E)) * 3)
    tx = optax.adam(1e-2)
    model = ReadMEModel.from_modules(router, backbone)
    rstep = steps.make_router_step(model, tx, "kl")
    rp, opt = router.arrays(), tx.init(router.arrays())
    losses = []
    for _ in range(3):
        rp, opt, m = rstep(rp, opt, tok[:, :-1], target, 1.0)
        losses.append(float(m["loss"]))
    assert losses[2] < losses[0]
    tr, fr = steps.split_params(backbone.arrays(), steps.FROZEN_TOP_KEYS_NO_EMBED)
    lstep = steps.make_lm_step(cfg, routed_ffn("xla"), steps.router_route_fn(model), tx)
    opt = tx.init(tr)
    losses = []
    for _ in range(3):
        tr, opt, m = lstep(tr, fr, opt, rp, tok, 1.0)
        losses.append(float(m["loss"]))
    assert losses[2] < losses[0]


class SyntheticData:
    """Three 'domains' with different token distributions; deterministic in (round, step)."""

    domains = ["a", "b", "c"]

    def __init__(self, vocab, T=12, seed=0):
        self.vocab, self.T, self.seed = vocab, T, seed

    def _blocks(self, key, n, dom):
        rng = np.random.default_rng(key)
        lo = (np.asarray(dom) * self.vocab) // 3
        return (lo[:, None] + rng.integers(0, self.vocab // 3, (n, self.T + 1))).astype(np.int32)

    def router_set(self, r, n):
        dom = np.arange(n) % 3
        return self._blocks((self.seed, r, 0), n, dom), dom

    def expert_batch(self, r, step, bs):
        return self._blocks((self.seed, r, 1, step), bs, np.arange(bs) % 3)

    def val_blocks(self):
        return {d: self._blocks((self.seed, 99, i), 2, np.full(2, i)) for i, d in enumerate(self.domains)}


def _trainer(tmp, cfg, router, ci, router_target="domain", **kw):
    tc = TrainConfig(rounds=2, router=StageConfig(steps=2, batch_size=4, lr=1e-3, seq_len=12),
                     experts=StageConfig(steps=2, batch_size=4, lr=1e-3, seq_len=12, grad_accum=2), **kw)
    return Trainer(tc, ci, F, SyntheticData(cfg.vocab_size), tmp,
                   progress=False, eval_batch_size=2, log=lambda s: None, router_target=router_target)


# domain+distill runs one round of each target, so it pins both in the fast suite; the single-target
# runs repeat it (27-32 s each in CI) and run under -m slow.
@pytest.mark.parametrize("target", [pytest.param("domain", marks=pytest.mark.slow),
                                    pytest.param("distill", marks=pytest.mark.slow), "domain+distill"])
def test_kill_and_resume_is_bitwise_equal(tmp_path, target):
    cfg, backbone, router, ci = _setup(4)
    w0 = ReadMEModel.from_modules(router, backbone)
    full = _trainer(tmp_path / "full", cfg, router, ci, target).run(w0)
    killed = _trainer(tmp_path / "killed", cfg, router, ci, target)
    killed.run(w0, stop_after_stages=1)
    resumed = _trainer(tmp_path / "killed", cfg, router, ci, target).run(w0)
    assert isinstance(full, ReadMEModel) and full.layout == w0.layout and full.router_cfg == w0.router_cfg
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s = stage_summaries(tmp_path / "full")
    assert [x["name"] for x in s] == ["initial", "round0-router", "round0-experts", "round1-router", "round1-experts"]
    from test_train_tracking import read_scalars

    tb = read_scalars(tmp_path / "full" / "tensorboard")  # every curve also as TensorBoard events
    assert [x for x, _ in tb["router/loss"]] == [0, 1, 2, 3] and len(tb["experts/loss"]) == 8
    assert [x for x, _ in tb["val/locality_mean"]] == [0, 1, 2, 3, 4]
    assert all(np.isfinite(list(x["val_ppl"].values())).all() for x in s)
    assert 0 <= s[-1]["locality_mean"] <= 1 and "agreement" in s[1]
    assert 0 <= s[-1]["router_accuracy_mean"] <= 1
    kinds = [s[1]["router_target"], s[3]["router_target"]]
    assert kinds == {"domain": ["domain", "domain"], "distill": ["distill", "distill"],
                     "domain+distill": ["domain", "distill"]}[target]
    if target != "domain":  # the distillation target's signal is measured and reported
        assert 0 <= s[3]["gap_mean"] <= 1 and 0 <= s[3]["teacher_domain_agreement"] <= 1


class _Kill(Exception):
    pass


# the router stage's variant (36 s in CI) runs under -m slow; both go through the same step
# checkpoints (Trainer._mid_save in train/loop.py), which the experts variant pins in the
# fast suite
@pytest.mark.parametrize("where", [pytest.param("router", marks=pytest.mark.slow), "experts"])
def test_kill_mid_stage_resumes_bitwise_equal(tmp_path, where):
    """train.checkpoint_every: a kill inside a stage resumes at the last step checkpoint, not the
    stage start, and ends bitwise equal to an uninterrupted run."""
    cfg, backbone, router, ci = _setup(5)
    w0 = ReadMEModel.from_modules(router, backbone)
    full = _trainer(tmp_path / "full", cfg, router, ci, checkpoint_every=1).run(w0)
    killed = _trainer(tmp_path / "killed", cfg, router, ci, checkpoint_every=1)
    calls = []
    if where == "experts":  # dies fetching round 1's second expert batch
        real = killed.data.expert_batch

        def dying(r, step, bs):
            if (r, step) == (1, 1):
                raise _Kill
            calls.append((r, step))
            return real(r, step, bs)

        killed.data.expert_batch = dying
    else:  # dies in round 1's second router step
        real_step = killed._router_step

        def dying_step(model, kind):
            fn = real_step(model, kind)

            def step(*a):
                calls.append(1)
                if len(calls) == 4:  # round 0: 2 steps; round 1: the 2nd
                    raise _Kill
                return fn(*a)
            return step

        killed._router_step = dying_step
    with pytest.raises(_Kill):
        killed.run(w0)
    assert (tmp_path / "killed" / "ckpt_mid" / "meta.json").is_file()
    log = []
    resumed = _trainer(tmp_path / "killed", cfg, router, ci, checkpoint_every=1)
    resumed.log = log.append
    if where == "experts":
        seen = []
        real2 = resumed.data.expert_batch
        resumed.data.expert_batch = lambda r, step, bs: (seen.append((r, step)), real2(r, step, bs))[1]
    out = resumed.run(w0)
    stage = 3 if where == "experts" else 2
    assert f"resuming stage {stage} at optimizer step 1 from {(tmp_path / 'killed' / 'ckpt_mid').absolute()}" in log
    if where == "experts":
        assert seen == [(1, 1)]  # only the step after the checkpoint was redone
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(out)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    full_rows = (tmp_path / "full" / "metrics" / f"stage_{stage:02d}.jsonl").read_text()
    assert (tmp_path / "killed" / "metrics" / f"stage_{stage:02d}.jsonl").read_text() == full_rows
    assert not (tmp_path / "killed" / "ckpt_mid").exists()  # superseded by the stage checkpoint


class TwoDomains:
    """Two domains over disjoint halves of the vocabulary, sharing a common pool of 'function' tokens."""

    domains = ["left", "right"]

    def __init__(self, vocab, T=16):
        self.vocab, self.T = vocab, T

    def blocks(self, key, dom):
        rng = np.random.default_rng(key)
        half = self.vocab // 2
        own = dom[:, None] * half + rng.integers(16, half, (len(dom), self.T + 1))
        common = rng.integers(0, 16, own.shape)  # tokens both domains use: only context tells them apart
        return np.where(rng.random(own.shape) < 0.2, common, own).astype(np.int32)

    def router_set(self, r, n):
        dom = np.arange(n) % 2
        return self.blocks((r, 0), dom), dom

    def expert_batch(self, r, step, bs):
        return self.blocks((r, 1, step), np.arange(bs) % 2)

    def val_blocks(self):
        return {d: self.blocks((99, i), np.full(4, i)) for i, d in enumerate(self.domains)}


def test_domain_router_phase_learns_two_domains(tmp_path):
    """The domain-supervised router phase alone reaches > 95 % held-out accuracy on a two-domain task."""
    cfg = tiny_model_config(n_layers=1, ffn_dim=F)
    backbone = MoEBackbone(cfg, rngs=nnx.Rngs(0), n_experts=2, expert_dim=FE)
    router = make_router(RouterConfig(width=32, n_heads=2, ffn_dim=32, seed=_seed() % 1000), 2, cfg.vocab_size, 64,
                         backbone_embed_VD=backbone.embed[...])
    data = TwoDomains(cfg.vocab_size)
    tc = TrainConfig(rounds=1, router=StageConfig(steps=60, batch_size=8, lr=3e-3, seq_len=16, warmup_steps=5),
                     experts=StageConfig(steps=1, batch_size=2, lr=1e-3, seq_len=16))
    ci = _channel_index(1, np.random.default_rng(0))[:, :2]
    t = Trainer(tc, ci, F, data, tmp_path, progress=False, log=lambda s: None, router_target="domain")
    w, _ = t._router_stage(0, ReadMEModel.from_modules(router, backbone))
    held_out = data.blocks(12345, np.arange(64) % 2)
    route = routes_for(w, held_out)
    acc = float(np.mean(route == (np.arange(64) % 2)[:, None]))
    assert acc > 0.95, acc


def test_freezing_really_freezes(tmp_path):
    cfg, backbone, router, ci = _setup(5)
    w0 = ReadMEModel.from_modules(router, backbone)
    t = _trainer(tmp_path, cfg, router, ci)
    after_router, _ = t._router_stage(0, w0)
    for a, b in zip(jax.tree.leaves(after_router.backbone_params), jax.tree.leaves(w0.backbone_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_router.router_params),
                                                         jax.tree.leaves(w0.router_params)))
    after_exp, _ = t._expert_stage(0, after_router)
    for a, b in zip(jax.tree.leaves(after_exp.router_params), jax.tree.leaves(after_router.router_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(after_exp.backbone_params["embed"]), np.asarray(w0.backbone_params["embed"]))
    assert not np.array_equal(np.asarray(after_exp.backbone_params["layers"]["wg"]),
                              np.asarray(w0.backbone_params["layers"]["wg"]))


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    cfg, backbone, router, ci = _setup(6)
    w0 = ReadMEModel.from_modules(router, backbone)
    t = _trainer(tmp_path, cfg, router, ci)
    t.run(w0, stop_after_stages=1)
    bad = dict(w0.backbone_params)
    bad["final_norm"] = jnp.full_like(bad["final_norm"], jnp.nan)
    t2 = _trainer(tmp_path, cfg, router, ci)
    t2._restore = lambda step, like: w0.replace(backbone_params=bad)
    with pytest.raises(TrainingError, match=r"non-finite loss .* round 0 experts at step 0.*after stage 1"):
        t2.run(w0)
    assert t2._ckpt.latest_step() == 1


def test_bad_train_config():
    with pytest.raises(ConfigError, match="train.rounds must be >= 1"):
        TrainConfig(rounds=0)
    with pytest.raises(ConfigError, match="train.router.steps must be >= 0"):
        TrainConfig(router=StageConfig(steps=-1))
    with pytest.raises(ConfigError, match="unknown config key.*rounds_"):
        load(TrainConfig, None, ["rounds_=3"])


def _converted(layout, seed=0):
    """A tiny dense model converted to E experts whose masks share channels (different counts per layer)."""
    from readme_jax.convert.experts import moe_arrays_from_dense
    from readme_jax.model.llama import Llama

    cfg = tiny_model_config(n_layers=2, ffn_dim=F)
    dense = jax.tree.map(np.asarray, Llama(cfg, rngs=nnx.Rngs(seed)).arrays())
    rng = np.random.default_rng(seed)
    m = np.zeros((E, 2, F), bool)
    for layer, n_shared in enumerate((6, 10)):
        shared = rng.permutation(F)[:n_shared]
        rest = np.setdiff1d(np.arange(F), shared)
        for e in range(E):
            m[e, layer, shared] = True
            m[e, layer, rng.choice(rest, FE - n_shared, replace=False)] = True
    params, meta = moe_arrays_from_dense(dense, m, layout=layout)
    return cfg, params, meta, m


def _tune(cfg, params, steps_n=3):
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16), E, cfg.vocab_size, 64,
                         backbone_embed_VD=params["embed"])
    tx = optax.adamw(1.0, weight_decay=0.01)
    tr, fr = steps.split_params(jax.tree.map(jnp.asarray, params), steps.FROZEN_TOP_KEYS_NO_EMBED)
    model = ReadMEModel(router.arrays(), params, router.cfg, cfg, ExpertLayout.of(params), router.mlp)
    lstep = steps.make_lm_step(cfg, routed_ffn("xla"), steps.router_route_fn(model), tx)
    opt = tx.init(tr)
    data = SyntheticData(cfg.vocab_size)
    for i in range(steps_n):
        tr, opt, _ = lstep(tr, fr, opt, router.arrays(), jnp.asarray(data.expert_batch(0, i, 6)), 1e-2)
    return steps.merge_params(tr, fr)


def test_shared_channels_stay_shared_through_training():
    """Split layout: one shared copy, trained, its zero padding still exactly zero; the fixed layout's
    copies of the same channels drift apart (the problem the split layout removes)."""
    cfg, split0, meta, m = _converted("split")
    split1 = _tune(cfg, split0)
    lay0, lay1 = split0["layers"], split1["layers"]
    assert not np.allclose(np.asarray(lay1["shared_wg"]), lay0["shared_wg"])  # the shared part learned
    pad = meta["shared_index"] < 0  # [L, P]: layers with fewer shared channels are zero-padded
    n_shared = m.all(0).sum(-1)
    assert pad.sum() == (n_shared.max() - n_shared).sum() > 0
    for k in ("shared_wg", "shared_wu", "shared_wd"):  # channel axis moved next to L: [L, P, D]
        w = np.asarray(lay1[k]) if k == "shared_wd" else np.moveaxis(np.asarray(lay1[k]), -1, 1)
        np.testing.assert_array_equal(w[pad], 0.0)
    spad = meta["channel_index"] < 0  # [L, E, R]
    assert spad.any()
    np.testing.assert_array_equal(np.moveaxis(np.asarray(lay1["wg"]), -1, 2)[spad], 0.0)
    np.testing.assert_array_equal(np.asarray(lay1["wd"])[spad], 0.0)

    cfg, fixed0, fmeta, _ = _converted("fixed")
    fixed1 = _tune(cfg, fixed0)
    ci = fmeta["channel_index"][0]  # layer 0: [E, F_e]
    shared = np.flatnonzero(m[:, 0].all(0))
    cols = [np.asarray(fixed1["layers"]["wg"][0, e])[:, np.searchsorted(ci[e], shared)] for e in range(E)]
    assert max(np.abs(cols[e] - cols[0]).max() for e in range(1, E)) > 1e-4  # copies drifted apart
