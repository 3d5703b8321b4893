"""Stages `train` (Read-ME's alternating rounds) and `baseline` (the equal-size pruned dense model
tuned with the same LM-token budget as the experts)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm.auto import tqdm

from readme_jax import config as config_mod
from readme_jax.checkpoints import save_params
from readme_jax.checkpoints.orbax_io import read_meta
from readme_jax.checkpoints.readme_io import load_readme, load_router, save_readme, save_router
from readme_jax.config import ModelConfig, StageConfig
from readme_jax.data import CHAT_DOMAIN, mixture_batches
from readme_jax.errors import TrainingError
from readme_jax.model import decoder
from readme_jax.model.readme_model import ExpertLayout, ReadMEModel
from readme_jax.model.router import make_router
from readme_jax.train import schedule, steps
from readme_jax.train.loop import Trainer
from readme_jax.workflow.refactor import load_moe, load_pruned
from readme_jax.workflow.workspace import Workspace, seed_of


class CorpusData:
    """The Trainer's data from the offline domains: deterministic in (seed, train.seed, round, stage, step)."""

    def __init__(self, ws: Workspace, domains: list[str]):
        self.ws, self.domains = ws, list(domains)
        self._ds = {}

    def _mixture(self, key, seq_len, batch_size, weights=None):
        full = (*key, seq_len, batch_size)  # a dataset is its name AND its shape
        if full not in self._ds:
            seed = seed_of(self.ws.cfg.seed, self.ws.cfg.train.seed, *key)
            self._ds[full] = mixture_batches(self.domains, self.ws.tokenizer, seq_len=seq_len, batch_size=batch_size,
                                             split="train", seed=seed, sep_id=self.ws.sep_id, weights=weights,
                                             cache_dir=self.ws.cfg.data.cache_dir, progress=False)
        return self._ds[full]

    def expert_weights(self) -> list[float] | None:
        """The expert-tuning mixture: every domain 1, the chat domain ``train.chat_weight`` (None: all equal)."""
        w = self.ws.cfg.train.chat_weight
        if w == 1.0 or CHAT_DOMAIN not in self.domains:
            return None
        return [w if d == CHAT_DOMAIN else 1.0 for d in self.domains]

    def router_set(self, round_idx, n_blocks):
        st = self.ws.cfg.train.router
        b = self._mixture(("router", round_idx), st.seq_len, n_blocks)[0]
        return np.asarray(b["tokens"], np.int32), np.asarray(b["domain"], np.int32)

    def expert_batch(self, round_idx, step, batch_size):
        st = self.ws.cfg.train.experts
        ds = self._mixture(("experts", round_idx), st.seq_len, batch_size, self.expert_weights())
        return np.asarray(ds[step]["tokens"], np.int32)

    def val_blocks(self):
        e = self.ws.cfg.eval
        n = 2  # after every stage: keep it cheap (fixed: the stage's record must not depend on eval.blocks_per_domain)
        return {d: self.ws.blocks(d, "validation", e.seq_len, n) for d in self.domains}


def build_router(ws: Workspace, n_experts: int, backbone_cfg: ModelConfig, embed):
    """The untrained router; its init seed is ``router.seed`` mixed with ``train.seed`` (0 keeps router.seed)."""
    rc = ws.cfg.router
    seed = rc.seed if ws.cfg.train.seed == 0 else seed_of(rc.seed, ws.cfg.train.seed)
    return make_router(dataclasses.replace(rc, seed=seed), n_experts, backbone_cfg.vocab_size,
                       backbone_cfg.max_seq_len, backbone_embed_VD=embed)


def initial_model(ws: Workspace) -> tuple[ReadMEModel, dict, np.ndarray]:
    """``(model, moe meta, channel_index)``: the refactored experts with a fresh router."""
    moe, cfg, meta, ci = load_moe(ws)
    router = build_router(ws, meta["n_experts"], cfg, moe["embed"])
    model = ReadMEModel(router.arrays(), moe, router.cfg, cfg, ExpertLayout.of(moe, meta["domains"]), router.mlp)
    return model.validate("refactored Read-ME"), meta, ci


def run_train(ws: Workspace) -> dict:
    t0 = time.time()
    model, meta, ci = initial_model(ws)
    d = ws.stage_dir("train")

    def keep_router_only(stage, name, m: ReadMEModel):  # the "router tuned, experts untouched" row of the results
        if stage == 0:  # the backbone is the refactored one (initial_model): only the router is saved
            save_router(d / "after_router0" / "router", m, router_config=ws.cfg.router)

    loss, teacher = recovery(ws)
    trainer = Trainer(ws.cfg.train, ci, meta["ffn_dim"], CorpusData(ws, meta["domains"]), d, impl=ws.cfg.impl,
                      progress=ws.progress, log=ws.log, on_stage_end=keep_router_only, mesh_cfg=ws.cfg.mesh,
                      router_target=ws.cfg.router.target, loss=loss, teacher_params=teacher)
    model = trainer.offload(model)  # sharded expert tuning: no device keeps the whole model meanwhile
    trained = trainer.run(model)
    save_readme(d / "final", trained, router_config=ws.cfg.router, backbone_meta={**meta, "trained": True})
    info = {"rounds": ws.cfg.train.rounds, "lm_tokens": lm_token_budget(ws), "router_tokens": router_token_budget(ws)}
    ws.mark_done("train", info, time.time() - t0)
    return info


def recovery(ws: Workspace) -> tuple[steps.LossSpec, dict | None]:
    """``(loss spec, teacher params)`` of expert tuning and of the pruned twin's (``train.expert_loss``): the
    same for both, so the comparison stays fair; the teacher is the dense source model (None for ``lm``)."""
    t = ws.cfg.train
    if t.expert_loss == "lm":
        return steps.LM_ONLY, None
    dense, _ = ws.dense
    spec = steps.LossSpec(kind=t.expert_loss, lm_weight=t.lm_weight, temperature=t.kd_temperature,
                          teacher_cfg=dense.cfg)
    return spec, dense.arrays()


def lm_token_budget(ws: Workspace) -> int:
    t = ws.cfg.train
    return t.rounds * t.experts.steps * t.experts.batch_size * t.experts.seq_len


def router_token_budget(ws: Workspace) -> int:
    t = ws.cfg.train
    return t.rounds * t.router.steps * t.router.batch_size * t.router.seq_len


def load_trained(ws: Workspace) -> ReadMEModel:
    """The trained Read-ME model of this run."""
    return load_readme(ws.out / "train" / "final")


def trained_meta(ws: Workspace) -> dict:
    """The trained backbone's provenance (conversion keys) plus the router's ``router_config``."""
    d = ws.out / "train" / "final"
    return {**read_meta(d / "backbone"), "router_config": read_meta(d / "router").get("router_config")}


def load_router_only(ws: Workspace) -> ReadMEModel | None:
    """Round 0's router on the refactored (untrained) experts; None when the run has not saved it."""
    path = ws.out / "train" / "after_router0" / "router"
    if not path.exists():
        return None
    moe, cfg, meta, _ = load_moe(ws)
    rp, rcfg, mlp = load_router(path, cfg)
    return ReadMEModel(rp, moe, rcfg, cfg, ExpertLayout.of(moe, meta["domains"]), mlp).validate(str(path))


def run_baseline(ws: Workspace) -> dict:
    """Tune the pruned dense model on the experts' LM batches (same data, same token budget)."""
    t0 = time.time()
    params, pcfg = load_pruned(ws)
    t = ws.cfg.train
    st = StageConfig(steps=t.rounds * t.experts.steps, batch_size=t.experts.batch_size, lr=t.experts.lr,
                     seq_len=t.experts.seq_len, grad_accum=t.experts.grad_accum,
                     warmup_steps=t.experts.warmup_steps * t.rounds)
    trainable, frozen = steps.split_params(params, steps.frozen_keys(t.train_embeddings))
    tx = schedule.make_optimizer(st, t.weight_decay, t.clip_norm)
    loss, teacher = recovery(ws)
    step_fn = steps.make_lm_step(pcfg, decoder.dense_ffn, None, tx, remat=t.remat == "layer", loss=loss)
    opt_state = tx.init(trainable)
    data = CorpusData(ws, load_moe_domains(ws))  # the very batches the experts see, in the same order
    losses = []
    for i in tqdm(range(st.steps), desc="pruned-dense baseline", disable=not ws.progress):
        batch = data.expert_batch(i // t.experts.steps, i % t.experts.steps, st.batch_size)
        trainable, opt_state, ms = steps.accumulated_step(step_fn, trainable, frozen, opt_state, None, batch,
                                                          st.grad_accum, schedule.lr_at(st, 0, 1.0, i), teacher)
        for m in ms:
            if not np.isfinite(m["loss"]):
                raise TrainingError(f"pruned-dense baseline: non-finite loss {m['loss']} at step {i}")
            losses.append(m["loss"])
    d = ws.stage_dir("baseline")
    save_params(d / "pruned_tuned", steps.merge_params(trainable, frozen),
                {"kind": "llama", "model_config": config_mod.to_dict(pcfg), "tokenizer_source": ws.cfg.model},
                overwrite=True)
    info = {"steps": st.steps, "lm_tokens": lm_token_budget(ws), "losses": losses}
    ws.mark_done("baseline", info, time.time() - t0)
    return info


def load_moe_domains(ws: Workspace) -> list[str]:
    return list(ws.done_info("refactor")["domains"])
