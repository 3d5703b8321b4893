"""Stages `train` (Read-ME's alternating rounds) and `baseline` (the equal-size pruned dense model
tuned with the same LM-token budget as the experts)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm.auto import tqdm

from readme_jax import config as config_mod
from readme_jax.checkpoints import restore_params, save_params
from readme_jax.config import ModelConfig, StageConfig
from readme_jax.data import mixture_batches
from readme_jax.errors import TrainingError
from readme_jax.model import decoder
from readme_jax.model.router import make_router, router_model_config, silu_bias_mlp
from readme_jax.train import schedule, steps
from readme_jax.train.loop import ReadMEWeights, Trainer
from readme_jax.workflow.refactor import load_moe, load_pruned
from readme_jax.workflow.workspace import Workspace, seed_of


class CorpusData:
    """The Trainer's data from the offline domains: deterministic in (seed, train.seed, round, stage, step)."""

    def __init__(self, ws: Workspace, domains: list[str]):
        self.ws, self.domains = ws, list(domains)
        self._ds = {}

    def _mixture(self, key, seq_len, batch_size):
        full = (*key, seq_len, batch_size)  # a dataset is its name AND its shape
        if full not in self._ds:
            seed = seed_of(self.ws.cfg.seed, self.ws.cfg.train.seed, *key)
            self._ds[full] = mixture_batches(self.domains, self.ws.tokenizer, seq_len=seq_len, batch_size=batch_size,
                                             split="train", seed=seed, sep_id=self.ws.sep_id,
                                             cache_dir=self.ws.cfg.data.cache_dir, progress=False)
        return self._ds[full]

    def router_set(self, round_idx, n_blocks):
        st = self.ws.cfg.train.router
        b = self._mixture(("router", round_idx), st.seq_len, n_blocks)[0]
        return np.asarray(b["tokens"], np.int32), np.asarray(b["domain"], np.int32)

    def expert_batch(self, round_idx, step, batch_size):
        st = self.ws.cfg.train.experts
        return np.asarray(self._mixture(("experts", round_idx), st.seq_len, batch_size)[step]["tokens"], np.int32)

    def val_blocks(self):
        e = self.ws.cfg.eval
        n = max(1, min(e.blocks_per_domain, 2))  # after every stage: keep it cheap
        return {d: self.ws.blocks(d, "validation", e.seq_len, n) for d in self.domains}


def build_router(ws: Workspace, n_experts: int, backbone_cfg: ModelConfig, embed):
    """The untrained router; its init seed is ``router.seed`` mixed with ``train.seed`` (0 keeps router.seed)."""
    rc = ws.cfg.router
    seed = rc.seed if ws.cfg.train.seed == 0 else seed_of(rc.seed, ws.cfg.train.seed)
    return make_router(dataclasses.replace(rc, seed=seed), n_experts, backbone_cfg.vocab_size,
                       backbone_cfg.max_seq_len, backbone_embed_VD=embed)


def run_train(ws: Workspace) -> dict:
    t0 = time.time()
    moe, cfg, meta, ci = load_moe(ws)
    router = build_router(ws, meta["n_experts"], cfg, moe["embed"])
    d = ws.stage_dir("train")
    router_meta = {"kind": "readme_router", "router_config": config_mod.to_dict(ws.cfg.router),
                   "n_experts": meta["n_experts"]}

    def keep_router_only(stage, name, w):  # the "router tuned, experts untouched" model of the results table
        if stage == 0:
            save_params(d / "after_router0" / "router", w.router, router_meta, overwrite=True)

    trainer = Trainer(ws.cfg.train, cfg, router.cfg, router.ffn_fn(), ci, meta["ffn_dim"],
                      CorpusData(ws, meta["domains"]), d, impl=ws.cfg.impl, progress=ws.progress, log=ws.log,
                      on_stage_end=keep_router_only, mesh_cfg=ws.cfg.mesh, router_target=ws.cfg.router.target)
    w = trainer.run(ReadMEWeights(router.arrays(), moe))
    save_params(d / "final" / "router", w.router, router_meta, overwrite=True)
    save_params(d / "final" / "backbone", w.backbone, {**meta, "trained": True}, overwrite=True)
    info = {"rounds": ws.cfg.train.rounds, "lm_tokens": lm_token_budget(ws), "router_tokens": router_token_budget(ws)}
    ws.mark_done("train", info, time.time() - t0)
    return info


def lm_token_budget(ws: Workspace) -> int:
    t = ws.cfg.train
    return t.rounds * t.experts.steps * t.experts.batch_size * t.experts.seq_len


def router_token_budget(ws: Workspace) -> int:
    t = ws.cfg.train
    return t.rounds * t.router.steps * t.router.batch_size * t.router.seq_len


def load_router(path, backbone_cfg: ModelConfig):
    """``(router_params, router_model_cfg, router_ffn)`` from a saved router checkpoint."""
    rp, rmeta = restore_params(path)
    rc = config_mod.from_dict(config_mod.RouterConfig, rmeta["router_config"])
    rcfg = router_model_config(rc, backbone_cfg.vocab_size, backbone_cfg.max_seq_len)
    return rp, rcfg, decoder.dense_ffn if rc.mlp == "swiglu" else silu_bias_mlp


def load_trained(ws: Workspace):
    """``(router_params, router_cfg, router_ffn, backbone_params, backbone_cfg, meta)``."""
    d = ws.out / "train" / "final"
    bp, bmeta = restore_params(d / "backbone")
    bcfg = config_mod.from_dict(ModelConfig, bmeta["model_config"])
    rp, rcfg, rffn = load_router(d / "router", bcfg)
    return rp, rcfg, rffn, bp, bcfg, bmeta


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
    step_fn = steps.make_lm_step(pcfg, decoder.dense_ffn, None, tx)
    opt_state = tx.init(trainable)
    data = CorpusData(ws, load_moe_domains(ws))  # the very batches the experts see, in the same order
    losses = []
    for i in tqdm(range(st.steps), desc="pruned-dense baseline", disable=not ws.progress):
        batch = data.expert_batch(i // t.experts.steps, i % t.experts.steps, st.batch_size)
        trainable, opt_state, ms = steps.accumulated_step(step_fn, trainable, frozen, opt_state, None, batch,
                                                          st.grad_accum, schedule.lr_at(st, 0, 1.0, i))
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
