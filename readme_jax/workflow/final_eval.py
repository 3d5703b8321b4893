"""Stage `final_eval`: the results table on held-out text, every row on the same blocks.

Rows: dense; pruned dense (same activated width) untuned and tuned with the experts' LM-token
budget; Read-ME with oracle (own-domain) routing before training; Read-ME with the round-0 router
and untouched experts ("router only"); Read-ME after all rounds. Plus the final router's
locality and expert load per domain.
"""

from __future__ import annotations

import math
import time

import numpy as np

from readme_jax.checkpoints import restore_params
from readme_jax import config as config_mod
from readme_jax.config import ModelConfig
from readme_jax.eval.routing import expert_load, locality, readme_domain_nll, routes_for
from readme_jax.workflow.refactor import dense_ppl, load_moe
from readme_jax.workflow.training import load_router, load_trained
from readme_jax.workflow.workspace import Workspace, write_json


def run_final_eval(ws: Workspace) -> dict:
    t0 = time.time()
    blocks = ws.eval_blocks()
    bs = ws.cfg.eval.batch_size
    impl = ws.cfg.impl
    ref = ws.done_info("refactor_eval")["ppl"]
    rows = {"dense": ref["dense"], "pruned_dense": ref["pruned_dense"], "readme_oracle_untrained": ref["moe_oracle"]}
    if ws.is_done("baseline"):
        pp, pmeta = restore_params(ws.out / "baseline" / "pruned_tuned")
        pcfg = config_mod.from_dict(ModelConfig, pmeta["model_config"])
        rows["pruned_dense_tuned"] = dense_ppl(pp, pcfg, blocks, bs, ws.progress, "pruned tuned")
    moe, cfg, meta, _ = load_moe(ws)
    r0 = ws.out / "train" / "after_router0" / "router"
    if r0.exists():
        rp0, rcfg0, rffn0 = load_router(r0, cfg)
        rows["readme_router_only"] = _ppl(readme_domain_nll(rp0, rcfg0, rffn0, moe, cfg, impl, blocks, bs))
    rp, rcfg, rffn, bp, bcfg, _ = load_trained(ws)
    rows["readme_trained"] = _ppl(readme_domain_nll(rp, rcfg, rffn, bp, bcfg, impl, blocks, bs))
    routes = {d: routes_for(rp, rcfg, rffn, b, bs) for d, b in blocks.items()}
    E = int(meta["n_experts"])
    out = {"ppl": rows,
           "locality": {d: locality(r) for d, r in routes.items()},
           "locality_mean": float(np.mean([locality(r) for r in routes.values()])),
           "expert_load": {d: expert_load(r, E).tolist() for d, r in routes.items()},
           "domains": meta["domains"],
           "eval": {"split": ws.cfg.eval.split, "seq_len": ws.cfg.eval.seq_len,
                    "blocks_per_domain": {d: int(len(b)) for d, b in blocks.items()}}}
    write_json(ws.stage_dir("final_eval") / "table.json", out)
    ws.mark_done("final_eval", out, time.time() - t0)
    return out


def _ppl(nll: dict) -> dict:
    return {d: math.exp(v) for d, v in nll.items()}
